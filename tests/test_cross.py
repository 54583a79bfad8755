"""proxy.cross: a pair of another tokenizer family steering the base through text, on the zoo's families.

- forced onto a pair of the base's own tokenizer, with candidates covering the vocabulary, it gives the
  same-tokenizer engine's tokens (every family);
- an expert equal to its anti-expert, of another family, gives the base's own `generate`;
- after every token, what the small pair has read plus what it holds back spells exactly the base's text,
  and each small model's cache holds the prompt and what it read (Metaspace, byte-level BPE, word-level,
  chat tokens added to the expert);
- rows joining a running batch (the server's) give what they give alone.
"""
from __future__ import annotations

import pytest
from helpers import assert_one_error_line, run_in_process
from test_zoo import FAMILIES, Loaded, ids, settings
from zoo import PROMPTS

from core.errors import UserError
from proxy.batcher import LiveBatch, LiveRow, Request
from proxy.bridge import _same_text
from proxy.cross import CrossPair
from proxy.engine import ProxyEngine, SteeringPair
from proxy.prompts import CHAT

# (base family, family of the steering pair): their tokenizers differ
CROSS = [("llama2", "qwen2"), ("qwen2", "llama2"), ("llama3", "wordlevel"), ("wordlevel", "gemma2"),
         ("pythia", "chatml")]


@pytest.fixture(scope="module")
def loaded(zoo):
    """A family's checkpoints, loaded once for the module (test_zoo.Loaded)."""
    cache: dict[str, Loaded] = {}
    return lambda name: cache.setdefault(name, Loaded(zoo[name])) if name not in cache else cache[name]


def cross_pair(p, alpha=1.0, expert="expert", **kw):
    return SteeringPair(p.model[expert], p.model["anti"], alpha, p.fmt if expert == "expert" else None,
                        tokenizer=p.tok[expert], anti_tokenizer=p.tok["anti"], **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cross_path_on_one_tokenizer_gives_the_same_tokens(loaded, family):
    f = loaded(family)
    plain = ProxyEngine(f.model["base"], f.tok["base"], f.pair())
    forced = ProxyEngine(f.model["base"], f.tok["base"], [cross_pair(f, cross=True)], candidates=10**6)
    assert forced.bridges and forced.bridges[0].identical
    for batch in (1, 4):
        want = [(g.token_ids, g.text, g.finish_reason) for g in plain.generate(PROMPTS, settings(batch))]
        assert [(g.token_ids, g.text, g.finish_reason) for g in forced.generate(PROMPTS, settings(batch))] == want


@pytest.mark.parametrize("base_family,pair_family", CROSS)
def test_a_cross_expert_equal_to_its_anti_expert_gives_the_base_own_generate(loaded, base_family, pair_family):
    b, p = loaded(base_family), loaded(pair_family)
    eng = ProxyEngine(b.model["base"], b.tok["base"], [cross_pair(p, alpha=1.5, expert="anti")])
    assert eng.bridges and not eng.bridges[0].identical  # through text
    assert ids(eng.generate(PROMPTS, settings(4))) == b.reference("base", eng.rules(settings(4)).config)


@pytest.mark.parametrize("base_family,pair_family", CROSS)
def test_the_small_pair_reads_the_base_text_after_every_token(loaded, base_family, pair_family, monkeypatch):
    b, p = loaded(base_family), loaded(pair_family)
    eng = ProxyEngine(b.model["base"], b.tok["base"], [cross_pair(p, alpha=2.0)])
    bridge = eng.bridges[0]
    written: dict[int, list[list[int]]] = {}
    checked = []
    step = CrossPair.step

    def checked_step(self, tokens, active=None):
        prompt = written.setdefault(id(self), [[] for _ in self.pending])
        before = [s.next_pos[:, 0].tolist() for s in self.streams]
        read_before = [len(r) for r in self.read]
        out = step(self, tokens, active)
        for r, c in enumerate(tokens.tolist()):
            if active is not None and not bool(active[r]) or c in bridge.base_stops:
                continue
            prompt[r].append(c)
            base_text = b"".join(bridge.base.bytes[t] or b"" for t in prompt[r])
            for chunk in self.skipped[r]:  # text the small vocabulary could not write (bytes or words it lacks)
                base_text = base_text.replace(chunk, b"", 1)
            small_text = b"".join(bridge.small.bytes[t] for t in self.read[r]) + self.pending[r]
            assert _same_text(small_text, base_text, bridge.small.word_level), (small_text, base_text)
            for m, stream in enumerate(self.streams):  # each cache grew by what the row read
                assert stream.next_pos[r, 0] == before[m][r] + len(self.read[r]) - read_before[r]
            checked.append(r)
        return out

    monkeypatch.setattr(CrossPair, "step", checked_step)
    gens = eng.generate(PROMPTS, settings(4))
    assert len(checked) >= len(PROMPTS) and any(g.token_ids for g in gens)
    if p.fmt == CHAT:  # the expert read its chat template's turn, in its own added tokens
        expert_stream = eng.streams[eng.pair_keys[0][0]]
        assert expert_stream.cross and expert_stream.fmt == CHAT


@pytest.mark.parametrize("base_family,pair_family", CROSS[:2])
def test_rows_joining_a_running_batch_give_what_they_give_alone(loaded, base_family, pair_family):
    b, p = loaded(base_family), loaded(pair_family)
    eng = ProxyEngine(b.model["base"], b.tok["base"], [cross_pair(p)])
    alone = [ids(eng.generate([prompt], settings(1)))[0] for prompt in PROMPTS]
    live, rows = LiveBatch(eng), []
    for i, prompt in enumerate(PROMPTS):  # one more request joins at each step
        request = Request(prompt=prompt, settings=settings(1), listener=lambda event: None)
        request.encoded = eng.encode_prompt(prompt, 16)
        live.admit([request])
        rows.append(live.members[-1])
        live.step()
    while live.members:
        live.step()
    assert [lr.row.generation(None, eng.tokenizer).token_ids for lr in rows] == alone
    assert isinstance(rows[0], LiveRow)


def test_what_the_cross_path_does_not_do_is_refused_in_one_line(loaded):
    b, p = loaded("llama2"), loaded("qwen2")
    eng = ProxyEngine(b.model["base"], b.tok["base"], [cross_pair(p)])
    with pytest.raises(UserError, match="another tokenizer family"):
        eng.score(["The quick"], [" brown"])
    from proxy.speculative import SpeculativeProxyEngine

    with pytest.raises(UserError, match="another family"):
        SpeculativeProxyEngine(b.model["base"], b.tok["base"], [cross_pair(p)], k=2)
    mixed = SteeringPair(p.model["expert"], b.model["anti"], tokenizer=p.tok["expert"], anti_tokenizer=b.tok["anti"])
    with pytest.raises(UserError, match="must share one tokenizer"):
        ProxyEngine(b.model["base"], b.tok["base"], [mixed])


def test_proxy_run_steers_through_text_and_says_so(zoo, tmp_path):
    from proxy.run import run as proxy_run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": {p!r}}}\n'.replace("'", '"') for p in PROMPTS[:2]))
    args = [f"base={zoo['llama2'].base}", f"expert={zoo['qwen2'].expert}", f"anti_expert={zoo['qwen2'].anti}",
            f"prompts={prompts}", "logger=none", "generation.max_new_tokens=6"]
    code, err = run_in_process("proxy", proxy_run, *args, out_dir=str(tmp_path / "run"))
    assert code == 0 and "through text" in err
    assert (tmp_path / "run" / "generations.jsonl").exists() or list((tmp_path / "run").rglob("*.jsonl"))
    code, err = run_in_process("proxy", proxy_run, *args, "proxy.speculative.k=2", out_dir=str(tmp_path / "spec"))
    assert_one_error_line(code, err, "another family", "proxy.speculative.k")
    code, err = run_in_process("proxy", proxy_run, *args, "proxy.cross.candidates=0", out_dir=str(tmp_path / "bad"))
    assert_one_error_line(code, err, "proxy.cross.candidates", "at least 1")


def test_plausibility_rules_out_what_the_base_finds_implausible_under_a_cross_offset():
    import torch

    from proxy.combine import proxy_logits

    base = torch.tensor([[0.0, -10.0, -1.0]])
    offset = torch.tensor([[0.0, 20.0, 0.0]])  # a cross pair's offset, given whole
    assert int(proxy_logits(base, [(1.0, offset, None)]).argmax()) == 1
    assert int(proxy_logits(base, [(1.0, offset, None)], plausibility=0.1).argmax()) == 0
    assert torch.equal(proxy_logits(base, [(0.0, offset, None)], plausibility=0.1), base)  # alpha 0: the base


def test_parallel_and_shared_pairs_refuse_a_cross_pair(loaded):
    b, p = loaded("llama2"), loaded("qwen2")
    with pytest.raises(UserError, match="proxy.parallel"):
        ProxyEngine(b.model["base"], b.tok["base"], [cross_pair(p)], parallel=True)
    shared = SteeringPair(p.model["expert"], p.model["anti"], shared=True, tokenizer=p.tok["expert"],
                          anti_tokenizer=p.tok["anti"])
    with pytest.raises(UserError, match="shared_pair=false"):
        ProxyEngine(b.model["base"], b.tok["base"], [shared])
