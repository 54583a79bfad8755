"""Exact invariants of the proxy engine on the tiny family (greedy, CPU)."""
from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from core.loading import load_model, load_tokenizer
from proxy.combine import RULED_OUT, proxy_logits
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from proxy.streams import left_pad

GREEDY = GenerationSettings(max_new_tokens=24, batch_size=8)


def engine(models, base="large", expert="expert", anti="small", alpha=1.0, plausibility=0.0, **kw):
    pairs = [SteeringPair(models[expert], models[anti], alpha=alpha, **kw)]
    return ProxyEngine(models[base], models["tok"], pairs, plausibility=plausibility)


def hf_greedy(model, tok, prompts, max_new_tokens):
    """The model's own generate(do_sample=False), one prompt at a time, as new token ids."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        out.append(new)
    return out


def ids(gens):
    return [g.token_ids for g in gens]


def test_alpha_zero_is_the_base_own_generate(models, prompts):
    gens = engine(models, alpha=0.0).generate(prompts, GREEDY)
    assert ids(gens) == hf_greedy(models["large"], models["tok"], prompts, GREEDY.max_new_tokens)
    assert all(len(g.token_ids) > 0 for g in gens)


def test_expert_equal_to_anti_expert_gives_the_base(models, prompts):
    steered = engine(models, expert="small", anti="small", alpha=1.5).generate(prompts, GREEDY)
    plain = ProxyEngine(models["large"], models["tok"]).generate(prompts, GREEDY)
    assert ids(steered) == ids(plain)


def test_base_equal_to_anti_expert_with_alpha_one_gives_the_expert(models, prompts):
    gens = engine(models, base="small", expert="expert", anti="small", alpha=1.0).generate(prompts, GREEDY)
    assert ids(gens) == hf_greedy(models["expert"], models["tok"], prompts, GREEDY.max_new_tokens)


def test_steering_changes_the_output(models, prompts):
    """Guards the invariants above against an engine that ignores the experts."""
    steered = engine(models, alpha=1.0).generate(prompts, GREEDY)
    plain = engine(models, alpha=0.0).generate(prompts, GREEDY)
    assert ids(steered) != ids(plain)


def uncached_proxy_greedy(models, prompt, alpha, max_new_tokens, plausibility=0.0):
    """Reference loop: every step re-runs all three models on the whole sequence. plausibility: only the
    tokens with at least that share of the base's or the expert's top probability may be picked."""
    tok = models["tok"]
    seq = tok(prompt)["input_ids"]
    eos = tok.eos_token_id
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([seq])
            s = {k: models[k](x).logits[0, -1].float() for k in ("large", "expert", "small")}
            scores = s["large"] + alpha * (s["expert"] - s["small"])
            if plausibility:
                p_base, p_expert = torch.softmax(s["large"], -1), torch.softmax(s["expert"], -1)
                keep = (p_base >= plausibility * p_base.max()) | (p_expert >= plausibility * p_expert.max())
                scores = torch.where(keep, scores, -torch.inf)
            nxt = int(scores.argmax())
            if nxt == eos:
                break
            seq.append(nxt)
            new.append(nxt)
    return new


def test_cached_loop_equals_uncached_loop(models, prompts):
    gens = engine(models, alpha=1.0).generate(prompts, GREEDY)
    assert ids(gens) == [uncached_proxy_greedy(models, p, 1.0, GREEDY.max_new_tokens) for p in prompts]


def test_plausibility_picks_only_what_the_base_or_the_expert_finds_plausible(models, prompts):
    gens = engine(models, alpha=1.0, plausibility=0.1).generate(prompts, GREEDY)
    assert ids(gens) == [uncached_proxy_greedy(models, p, 1.0, GREEDY.max_new_tokens, 0.1) for p in prompts]
    assert ids(gens) != ids(engine(models, alpha=1.0).generate(prompts, GREEDY))  # it changed something here
    # the base's and the expert's own top tokens are always plausible: at alpha 0 it is the base's answer,
    # with the base as anti-expert at alpha 1 the expert's
    assert ids(engine(models, alpha=0.0, plausibility=0.5).generate(prompts, GREEDY)) == \
        hf_greedy(models["large"], models["tok"], prompts, GREEDY.max_new_tokens)
    assert ids(engine(models, base="small", anti="small", plausibility=0.5).generate(prompts, GREEDY)) == \
        hf_greedy(models["expert"], models["tok"], prompts, GREEDY.max_new_tokens)


def test_plausibility_drops_tokens_only_the_offset_s_tail_lifts():
    base = torch.tensor([2.0, -1.0, 0.0, -3.0])
    expert = torch.tensor([0.0, 3.5, 0.0, -3.0])
    anti = torch.tensor([0.0, 0.0, 0.0, -12.0])  # rules token 3 out where the expert merely doubts it
    plain = proxy_logits(base, [(1.0, expert, anti)])
    assert plain.tolist() == [2.0, 2.5, 0.0, 6.0] and int(plain.argmax()) == 3
    kept = proxy_logits(base, [(1.0, expert, anti)], plausibility=0.1)
    # token 0 and 2: plausible to the base (e^-2 > 0.1); token 1: the expert's top; token 3: to neither
    assert kept.tolist() == [2.0, 2.5, 0.0, 6.0 - RULED_OUT] and int(kept.argmax()) == 1
    assert torch.softmax(kept, -1)[3] == 0  # probability 0, the score finite
    # a decoding rule that removes every plausible token (min_new_tokens, suppress_tokens) leaves the
    # proxy's own order among the rest: its next best, and a distribution to sample from
    forced = kept.masked_fill(torch.tensor([True, True, True, False]), -torch.inf)
    assert int(forced.argmax()) == 3 and torch.softmax(forced, -1).tolist() == [0.0, 0.0, 0.0, 1.0]
    rows = proxy_logits(base.expand(2, 4), [(torch.tensor([[1.0], [0.0]]), expert, anti)], plausibility=0.1)
    assert rows[0].tolist() == kept.tolist()
    assert rows[1].tolist() == base.tolist()  # a row no pair steers (alpha 0) keeps the base's own law
    assert proxy_logits(base, [(0.0, expert, anti)], plausibility=0.1).tolist() == base.tolist()


def test_batch_equals_rows_one_at_a_time(models, prompts):
    eng = engine(models, alpha=1.0)
    batched = eng.generate(prompts, GREEDY)
    alone = [eng.generate([p], GREEDY)[0] for p in prompts]
    assert len({len(models["tok"](p)["input_ids"]) for p in prompts}) > 1, "prompts must differ in length"
    assert ids(batched) == ids(alone)


def test_rows_stop_independently_at_their_stop_strings(models, prompts):
    eng = engine(models, alpha=1.0)
    free = eng.generate(prompts, GREEDY)
    # a stop string taken from the middle of row 0's free output: row 0 must stop there, the others run on
    text0 = free[0].text
    stop = text0[len(text0) // 2 : len(text0) // 2 + 3]
    assert stop.strip(), f"row 0 output too short to pick a stop string: {text0!r}"
    stopped = eng.generate(prompts, GenerationSettings(max_new_tokens=24, stop=[stop]))
    assert stopped[0].finish_reason == "stop"
    assert stop not in stopped[0].text and text0.startswith(stopped[0].text)
    assert len(stopped[0].token_ids) < len(free[0].token_ids)
    for free_row, row in zip(free[1:], stopped[1:]):
        if stop in free_row.text:
            assert row.finish_reason == "stop" and free_row.text.startswith(row.text)
        else:  # unaffected by row 0 having finished
            assert row.token_ids == free_row.token_ids and row.finish_reason == free_row.finish_reason


def test_padded_vocabulary_expert_combines(models, tiny_family, prompts):
    padded = load_model(tiny_family.padded_expert)
    assert padded.get_output_embeddings().weight.shape[0] > len(models["tok"])
    plain = engine(models, alpha=1.0).generate(prompts, GREEDY)
    eng = ProxyEngine(models["large"], models["tok"], [SteeringPair(padded, models["small"], 1.0)])
    assert eng.vocab_size == len(models["tok"])
    assert ids(eng.generate(prompts, GREEDY)) == ids(plain)


def test_mismatched_tokenizer_is_refused_with_the_first_differing_token(models, tiny_family):
    foreign = load_model(tiny_family.foreign)
    with pytest.raises(UserError, match=r"does not match.*token id \d+ is"):
        ProxyEngine(models["large"], models["tok"], [SteeringPair(foreign, models["small"])],
                    tokenizers={"expert 'foreign'": load_tokenizer(tiny_family.foreign)})


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_alpha_is_refused(models, alpha):
    with pytest.raises(UserError, match="finite"):
        engine(models, alpha=alpha)


def test_prompt_longer_than_the_context_is_refused(models):
    with pytest.raises(UserError, match="exceeds the model's context"):
        engine(models).generate([" a b c" * 200], GREEDY)


def test_expert_format_is_seen_by_the_expert_only(models, prompts):
    fmt = "Question: {prompt}\nAnswer:"
    eng = engine(models, alpha=1.0, expert_format=fmt)
    gens = eng.generate(prompts[:1], GREEDY)
    tok = models["tok"]
    # reference: expert on the formatted prompt, base and anti on the raw one, same generated tokens
    raw, fmt_ids = tok(prompts[0])["input_ids"], tok(fmt.replace("{prompt}", prompts[0]))["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):
            b = models["large"](torch.tensor([raw + new])).logits[0, -1]
            a = models["small"](torch.tensor([raw + new])).logits[0, -1]
            e = models["expert"](torch.tensor([fmt_ids + new])).logits[0, -1]
            nxt = int((b + e - a).argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert gens[0].token_ids == new


def test_sampling_is_seeded_and_uses_the_warpers(models, prompts):
    eng = engine(models, alpha=1.0)
    s = GenerationSettings(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a, b = eng.generate(prompts, s), eng.generate(prompts, s)
    assert ids(a) == ids(b)
    c = eng.generate(prompts, GenerationSettings(**{**s.__dict__, "seed": 8}))
    assert ids(a) != ids(c)
    greedy_top1 = eng.generate(prompts, GenerationSettings(max_new_tokens=16, do_sample=True, top_k=1, seed=3))
    assert ids(greedy_top1) == ids(eng.generate(prompts, GenerationSettings(max_new_tokens=16)))


def test_diagnostics_report_changed_tokens_and_kl(models, prompts):
    eng = engine(models, alpha=1.0)
    gens = eng.generate(prompts, GREEDY, diagnostics=True)
    for g in gens:
        assert len(g.diagnostics) == len(g.token_ids) + (g.finish_reason == "eos")
        for d in g.diagnostics:
            assert d["changed"] == (d["base_top_id"] != d["proxy_top_id"])
            assert d["kl_proxy_base"] >= 0 and d["offset_norm"] > 0
    share = eng.last_stats.changed_share
    assert 0 < share < 1
    zero = engine(models, alpha=0.0)
    zero.generate(prompts, GREEDY, diagnostics=True)
    assert zero.last_stats.changed_share == 0
    for g in engine(models, alpha=1.0, plausibility=0.1).generate(prompts, GREEDY, diagnostics=True):
        assert all(0 <= d["kl_proxy_base"] < float("inf") and 0 < d["offset_norm"] < float("inf")
                   for d in g.diagnostics)  # tokens the constraint drops add nothing, not infinities


@pytest.mark.parametrize("plausibility", [0.0, 0.5])
def test_score_matches_a_direct_computation(models, plausibility):
    """The likelihood of a given text is the paper's proxy law, with or without proxy.plausibility (which
    only shapes what decoding picks: under it most texts would score -inf)."""
    eng = engine(models, alpha=0.7, plausibility=plausibility)
    tok = models["tok"]
    prompts = [" the quick", " Question: where was the person born?\nAnswer:"]
    conts = [" brown fox", " in a city"]
    got = eng.score(prompts, conts)
    for p, c, r in zip(prompts, conts, got):
        full = tok(p + c)["input_ids"]
        n = len(full) - len(tok(p)["input_ids"])
        with torch.no_grad():
            x = torch.tensor([full])
            s = {k: models[k](x).logits[0].float() for k in ("large", "expert", "small")}
        lp = torch.log_softmax(s["large"] + 0.7 * (s["expert"] - s["small"]), -1)
        want = sum(float(lp[len(full) - n - 1 + j, full[len(full) - n + j]]) for j in range(n))
        assert r["num_tokens"] == n
        assert r["logprob"] == pytest.approx(want, abs=1e-4)


def test_left_pad_aligns_rows_on_the_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_chat_format_uses_the_expert_tokenizer_template(models, prompts):
    """A base without a chat template steered by a chat expert: the expert's own template renders its prompt."""
    import copy

    chat_tok = copy.deepcopy(models["tok"])
    chat_tok.chat_template = "{% for m in messages %}<|user|> {{ m['content'] }}\n{% endfor %}<|assistant|>"
    assert not getattr(models["tok"], "chat_template", None)
    eng = engine(models, alpha=1.0, expert_format="chat", tokenizer=chat_tok)
    rendered = eng.encode(prompts[0], "chat")
    assert rendered == models["tok"](f"<|user|> {prompts[0]}\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert eng.generate(prompts[:1], GREEDY)[0].token_ids


def test_small_models_in_a_second_process_give_the_same_tokens(models, prompts):
    from proxy.parallel import parallel_available

    if not parallel_available():
        pytest.skip("needs a second core and fork")
    sequential = engine(models, alpha=1.0)
    parallel = ProxyEngine(models["large"], models["tok"], [SteeringPair(models["expert"], models["small"], 1.0)],
                           parallel=True)
    try:
        for settings in (GREEDY, GenerationSettings(max_new_tokens=12, batch_size=3, stop=["e"])):
            want = sequential.generate(prompts, settings, diagnostics=True)
            got = parallel.generate(prompts, settings, diagnostics=True)
            assert [(g.token_ids, g.finish_reason) for g in got] == [(g.token_ids, g.finish_reason) for g in want]
            assert parallel.last_stats.changed_share == sequential.last_stats.changed_share
    finally:
        parallel.close()
    assert parallel._worker is None


class OlderForward(torch.nn.Module):
    """A model whose forward still takes its cache as `past_key_values` (transformers before the rename to
    `cache`, and remote code that kept the old name)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.generation_config = model, model.config, model.generation_config
        self.calls = 0

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0):
        assert past_key_values is not None  # the engine always hands its own cache over
        self.calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, logits_to_keep=logits_to_keep, cache=past_key_values)


def test_the_cache_goes_under_the_name_the_model_takes(models, prompts):
    from proxy.streams import cache_argument

    assert cache_argument(models["large"]) == "cache"  # the installed transformers' name
    older = OlderForward(models["expert"])
    assert cache_argument(older) == "past_key_values"
    settings = GenerationSettings(max_new_tokens=8, batch_size=4)
    want = engine(models).generate(prompts, settings)
    got = ProxyEngine(models["large"], models["tok"], [SteeringPair(older, models["small"], 1.0)]).generate(prompts, settings)
    assert ids(got) == ids(want) and older.calls > 1  # a prefill, then one cached step a token
