"""Speculative proxy decoding is exact: greedy output equals the plain engine's; sampling follows the proxy law."""
from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from proxy.speculative import DraftLength, SpeculativeProxyEngine, expected_speedup


def pair(models, alpha=1.0):
    return [SteeringPair(models["expert"], models["small"], alpha)]


@pytest.fixture(scope="module")
def plain_output(models, prompts):
    """The plain engine's greedy output, once (a batch equals its rows: one answer for every batch size)."""
    settings = GenerationSettings(max_new_tokens=20)
    return ProxyEngine(models["large"], models["tok"], pair(models)).generate(prompts, settings)


@pytest.mark.parametrize("k", [1, 2, 4, 6, "auto"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_greedy_is_token_for_token_the_plain_engine(models, prompts, plain_output, k, batch_size):
    settings = GenerationSettings(max_new_tokens=20, batch_size=batch_size)
    plain = plain_output
    spec = SpeculativeProxyEngine(models["large"], models["tok"], pair(models), k=k)
    fast = spec.generate(prompts, settings)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]
    stats = spec.last_stats
    assert stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1


@pytest.mark.parametrize("batch_size", [1, 8])
def test_greedy_with_plausibility_is_the_plain_engine_s(models, prompts, batch_size):
    settings = GenerationSettings(max_new_tokens=20, batch_size=batch_size)
    plain = ProxyEngine(models["large"], models["tok"], pair(models), plausibility=0.1).generate(prompts, settings)
    spec = SpeculativeProxyEngine(models["large"], models["tok"], pair(models), k=2, plausibility=0.1)
    assert [g.token_ids for g in spec.generate(prompts, settings)] == [g.token_ids for g in plain]


def test_an_expert_that_agrees_with_the_proxy_is_fully_accepted(models, prompts):
    """Base == anti-expert at alpha 1: the proxy is the expert, so every draft is accepted."""
    eng = SpeculativeProxyEngine(models["small"], models["tok"], pair(models), k=4)
    gens = eng.generate(prompts, GenerationSettings(max_new_tokens=21, min_new_tokens=21))
    assert eng.last_stats.acceptance_rate == 1.0
    # rounds of 5 tokens per row, the first one inside the prefill: 5 base forwards for 21 tokens
    assert eng.last_stats.base_forwards_per_token == pytest.approx(5 / 21)
    plain = ProxyEngine(models["small"], models["tok"], pair(models))
    assert [g.token_ids for g in gens] == [g.token_ids for g in
                                          plain.generate(prompts, GenerationSettings(max_new_tokens=21, min_new_tokens=21))]


def test_stop_strings_and_min_new_tokens_match_the_plain_engine(models, prompts):
    plain_engine = ProxyEngine(models["large"], models["tok"], pair(models))
    free = plain_engine.generate(prompts, GenerationSettings(max_new_tokens=24))
    tok = models["tok"]
    # a stop string made of one cleanly decoding token a few tokens into a row's free output
    row, stop = next((r, t) for r in range(len(free)) for i in range(2, 20)
                     if "\ufffd" not in (t := tok.decode(free[r].token_ids[i : i + 1])) and t.strip())
    settings = GenerationSettings(max_new_tokens=24, min_new_tokens=5, stop=[stop])
    want = plain_engine.generate(prompts, settings)
    got = SpeculativeProxyEngine(models["large"], models["tok"], pair(models), k=3).generate(prompts, settings)
    assert [(g.token_ids, g.text, g.finish_reason) for g in got] == [(g.token_ids, g.text, g.finish_reason) for g in want]
    assert want[row].finish_reason == "stop"


def test_drafting_stops_where_no_draft_could_be_kept(models, prompts):
    """A draft that ends the row (a stop string here) and the token budget both end the round's drafting."""
    tok = models["tok"]
    eng = SpeculativeProxyEngine(models["small"], tok, pair(models), k=8)  # base == anti: every draft accepted
    free = eng.generate(prompts, GenerationSettings(max_new_tokens=24, batch_size=1))
    row, at, stop = next((r, i, t) for r in range(len(free)) for i in range(1, 6)
                         if "\ufffd" not in (t := tok.decode(free[r].token_ids[i : i + 1])) and t.strip()
                         and t not in tok.decode(free[r].token_ids[:i]))
    gen = eng.generate([prompts[row]], GenerationSettings(max_new_tokens=24, stop=[stop], batch_size=1))[0]
    assert gen.finish_reason == "stop" and gen.token_ids == free[row].token_ids[: at + 1]
    assert eng.last_stats.drafted == at + 1  # not the 8 a fixed k would draft
    assert eng.terminal_ids([stop]).tolist().count(free[row].token_ids[at]) == 1
    eng.generate([prompts[row]], GenerationSettings(max_new_tokens=3, batch_size=1))
    assert eng.last_stats.drafted == 3 and eng.last_stats.new_tokens == 3


@pytest.mark.slow
def test_sampling_follows_the_proxy_distribution(models):
    """Two-token sequences sampled speculatively have the proxy's joint law (chi-square, fixed seed)."""
    tok = models["tok"]
    prompt = " the quick brown"
    alpha = 0.5
    temperature = 1.5
    eng = SpeculativeProxyEngine(models["large"], tok, pair(models, alpha), k=2)
    n = 2500
    settings = GenerationSettings(max_new_tokens=2, min_new_tokens=2, do_sample=True, temperature=temperature,
                                  top_k=4, seed=123, batch_size=n)
    gens = eng.generate([prompt] * n, settings)
    counts: dict[tuple, int] = {}
    for g in gens:
        counts[tuple(g.token_ids)] = counts.get(tuple(g.token_ids), 0) + 1
    # exact proxy law over the first two tokens, with the same warpers
    ids = tok(prompt)["input_ids"]

    def proxy_probs(seq):
        with torch.no_grad():
            x = torch.tensor([seq])
            s = {k: models[k](x).logits[0, -1].float() for k in ("large", "expert", "small")}
        scores = (s["large"] + alpha * (s["expert"] - s["small"])) / temperature
        top = torch.topk(scores, 4)
        probs = torch.zeros_like(scores)
        probs[top.indices] = torch.softmax(top.values, -1)
        return probs

    p1 = proxy_probs(ids)
    expected = {}
    for a in p1.nonzero().flatten().tolist():
        p2 = proxy_probs(ids + [a])
        for b in p2.nonzero().flatten().tolist():
            expected[(a, b)] = float(p1[a] * p2[b])
    assert set(counts) <= set(expected)
    chi2 = sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in expected.items() if n * p >= 5)
    dof = sum(1 for p in expected.values() if n * p >= 5) - 1
    # 99.9% quantile of chi-square is below dof + 3.3*sqrt(2 dof) + 10 for these sizes
    assert chi2 < dof + 3.3 * (2 * dof) ** 0.5 + 10, (chi2, dof)
    assert eng.last_stats.acceptance_rate > 0


def test_k_is_validated_and_auto_adapts():
    with pytest.raises(UserError, match="between 1 and"):
        DraftLength(0)
    d = DraftLength("auto")
    for _ in range(20):
        d.update(accepted=0.95 * d.k, drafted=d.k, t_draft=0.1, t_rest=1.0)
    high = d.k
    d = DraftLength("auto")
    for _ in range(20):
        d.update(accepted=0.1 * d.k, drafted=d.k, t_draft=0.5, t_rest=1.0)
    assert high > d.k >= 1


def test_cost_model_breaks_even_where_the_probe_measured():
    """The research probe put break-even near r = 3.3-3.7 at its measured acceptance."""
    assert expected_speedup(0.6, 4, r=2.4, verify_cost=1.3) < 1 < expected_speedup(0.6, 4, r=10, verify_cost=1.3)
