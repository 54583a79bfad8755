"""The zoo (tests/zoo.py): every family through the engine, against the library's own behaviour on the
same models (`generate` with the run's generation config, the text-generation pipeline, PEFT's merge).

Invariants, exact, for the plain and the speculative engine at batch 1 and 4:
- alpha 0 is the base's own `generate`, stopping where any model of the run ends;
- an expert equal to its anti-expert gives the base alone;
- base equal to anti-expert at alpha 1 gives the expert's own `generate` on its own rendering;
- speculative equals plain; a shared LoRA pair equals its merged expert and the anti-expert.
"""
from __future__ import annotations

import copy

import pytest
import torch
from zoo import PROMPTS

from core.loading import load_model, load_tokenizer
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from proxy.prompts import CHAT, render
from proxy.speculative import SpeculativeProxyEngine

FAMILIES = ["llama2", "llama3", "mistral", "qwen2", "gemma2", "pythia", "olmo", "tulu", "chatml", "wordlevel"]
ENGINES = ["plain", "speculative"]


class Loaded:
    """A family's checkpoints loaded once: tokenizers and models by role."""

    def __init__(self, family):
        self.family = family
        self.tok = {role: load_tokenizer(getattr(family, role)) for role in ("base", "anti", "expert")}
        self.model = {role: load_model(getattr(family, role)) for role in ("base", "anti", "expert")}
        self.fmt = CHAT if family.chat else None
        self._references: dict[tuple, list[list[int]]] = {}

    def reference(self, role, config, fmt=None, extra_ends=()) -> list[list[int]]:
        """`library_generate` of a role's model over PROMPTS, once per config (engines and batch sizes share it)."""
        key = (role, fmt, config.to_json_string(), tuple(extra_ends))
        if key not in self._references:
            self._references[key] = library_generate(self.model[role], self.tok[role], PROMPTS, config, fmt, extra_ends)
        return self._references[key]

    def pair(self, alpha=1.0, expert="expert", fmt="own"):
        return [SteeringPair(self.model[expert], self.model["anti"], alpha, self.fmt if fmt == "own" else fmt,
                             tokenizer=self.tok[expert], anti_tokenizer=self.tok["anti"])]


@pytest.fixture(scope="module")
def loaded(zoo):
    cache: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in cache:
            cache[name] = Loaded(zoo[name])
        return cache[name]

    return get


def engine(kind, base, tok, pairs):
    if kind == "speculative":
        return SpeculativeProxyEngine(base, tok, pairs, k=3)
    return ProxyEngine(base, tok, pairs)


def settings(batch, **kw):
    return GenerationSettings(max_new_tokens=16, do_sample=False, batch_size=batch, **kw)


def library_generate(model, tok, prompts, config, fmt=None, extra_ends=()):
    """The model's own `generate` with `config`, one prompt at a time; the new ids before the first end id."""
    config = copy.deepcopy(config)
    config.eos_token_id = sorted(set(config.eos_token_id) | set(extra_ends))
    out = []
    for p in prompts:
        text = render(p, fmt, tok)
        ids = tok(text, add_special_tokens=fmt != CHAT, return_tensors="pt")
        new = model.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1]:].tolist()
        end = next((i for i, t in enumerate(new) if t in config.eos_token_id), len(new))
        out.append(new[:end])
    return out


def ids(gens):
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_the_base_own_generate(loaded, family, kind, batch):
    f = loaded(family)
    eng = engine(kind, f.model["base"], f.tok["base"], f.pair(alpha=0.0))
    gens = eng.generate(PROMPTS, settings(batch))
    assert ids(gens) == f.reference("base", eng.rules(settings(batch)).config)
    assert any(g.finish_reason == "eos" for g in gens), "the zoo's bases end part-way"


@pytest.mark.parametrize("family", FAMILIES)
def test_text_is_the_text_generation_pipeline_s(loaded, family):
    from transformers import pipeline

    f = loaded(family)
    eng = ProxyEngine(f.model["base"], f.tok["base"], f.pair(alpha=0.0))
    gens = eng.generate(PROMPTS, settings(4))
    pipe = pipeline("text-generation", model=f.model["base"], tokenizer=f.tok["base"])
    config = eng.rules(settings(4)).config
    for p, g in zip(PROMPTS, gens):
        assert pipe(p, generation_config=config, return_full_text=False)[0]["generated_text"] == g.text


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_equal_to_anti_expert_gives_the_base(loaded, family, kind):
    f = loaded(family)
    steered = engine(kind, f.model["base"], f.tok["base"], f.pair(alpha=1.5, expert="anti", fmt=None))
    alone = ProxyEngine(f.model["base"], f.tok["base"])
    assert ids(steered.generate(PROMPTS, settings(4))) == ids(alone.generate(PROMPTS, settings(4)))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_base_equal_to_anti_expert_gives_the_expert_on_its_own_rendering(loaded, family, kind, batch):
    f = loaded(family)
    eng = engine(kind, f.model["anti"], f.tok["anti"], f.pair(alpha=1.0))
    gens = eng.generate(PROMPTS, settings(batch))
    expert_ends = eng.streams[eng.pair_keys[0][0]].ends  # its own ends, also those past the shared vocabulary
    want = f.reference("expert", eng.rules(settings(batch)).config, fmt=f.fmt, extra_ends=expert_ends)
    assert ids(gens) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_equals_plain_at_alpha_one(loaded, family):
    f = loaded(family)
    for batch in (1, 4):
        plain = ProxyEngine(f.model["base"], f.tok["base"], f.pair()).generate(PROMPTS, settings(batch))
        fast = engine("speculative", f.model["base"], f.tok["base"], f.pair()).generate(PROMPTS, settings(batch))
        assert [(g.token_ids, g.text, g.finish_reason) for g in fast] == \
               [(g.token_ids, g.text, g.finish_reason) for g in plain]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_an_instruct_base_decodes_with_its_generation_config(zoo, family):
    """Llama-3-Instruct ends on <|eom_id|> too; Qwen2.5-Instruct asks for a repetition penalty."""
    path = zoo[family].instruct_base
    model, tok = load_model(path), load_tokenizer(path)
    for kind in ENGINES:
        eng = engine(kind, model, tok, [SteeringPair(model, model, 1.0, tokenizer=tok, anti_tokenizer=tok)])
        for batch in (1, 4):
            rules = eng.rules(settings(batch))
            assert ids(eng.generate(PROMPTS, settings(batch))) == library_generate(model, tok, PROMPTS, rules.config)
    gen = model.generation_config
    assert (family == "llama3" and len(gen.eos_token_id) == 3) or (family == "qwen2" and gen.repetition_penalty > 1)


def test_a_base_and_its_instruct_model_share_one_stop_set(loaded):
    """Llama-3: base <|end_of_text|>, instruct <|eot_id|> and <|eom_id|>: accepted, and all three end a row."""
    f = loaded("llama3")
    eng = ProxyEngine(f.model["base"], f.tok["base"], f.pair())
    names = {f.tok["expert"].convert_ids_to_tokens(i) for i in eng.stop_ids}
    assert names == {"<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"}
    assert f.tok["base"].eos_token_id != f.tok["expert"].eos_token_id


def test_an_expert_s_own_end_of_turn_ends_the_proxy(loaded):
    """ChatML added to a Mistral vocabulary: <|im_end|> lies past the base's vocabulary, so its probability
    joins the shared EOS; the expert ends its turns there and so does the proxy."""
    f = loaded("chatml")
    im_end = f.tok["expert"].convert_tokens_to_ids("<|im_end|>")
    eng = ProxyEngine(f.model["anti"], f.tok["anti"], f.pair())
    assert im_end >= eng.vocab_size and im_end in eng.streams[eng.pair_keys[0][0]].ends
    rendered = eng.encode(PROMPTS[0], CHAT, key=eng.pair_keys[0][0])
    assert f.tok["expert"].convert_tokens_to_ids("<|im_start|>") in rendered  # its own token, not <unk>
    gens = eng.generate(PROMPTS, settings(4))
    assert any(g.finish_reason == "eos" for g in gens)


# ---------------------------------------------------------------------------- a shared LoRA pair

@pytest.fixture(scope="module")
def lora_pairs(zoo, tmp_path_factory):
    """Per family: an adapter over the small base saved as a folder, and the same adapter merged."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for name in FAMILIES:
        family = zoo[name]
        torch.manual_seed(0)
        peft_model = get_peft_model(load_model(family.anti), LoraConfig(
            r=4, lora_alpha=8, target_modules=family.lora_targets, init_lora_weights=False)).eval()
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(20)
        folder = tmp_path_factory.mktemp(f"lora_{name}")
        peft_model.save_pretrained(folder)
        out[name] = (str(folder), copy.deepcopy(peft_model).merge_and_unload())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_lora_pair_gives_the_tokens_of_two_models(loaded, lora_pairs, family):
    from proxy.shared_pair import load_shared_pair

    f = loaded(family)
    folder, merged = lora_pairs[family]
    base, tok = f.model["base"], f.tok["base"]
    two = [SteeringPair(merged, f.model["anti"], 1.0, tokenizer=f.tok["anti"], anti_tokenizer=f.tok["anti"])]
    shared = load_shared_pair(folder)
    one = [SteeringPair(shared, shared, 1.0, shared=True, tokenizer=f.tok["anti"], anti_tokenizer=f.tok["anti"])]
    want = ids(ProxyEngine(base, tok, two).generate(PROMPTS, settings(4)))
    assert ids(ProxyEngine(base, tok, one).generate(PROMPTS, settings(1))) == want
    assert ids(engine("speculative", base, tok, one).generate(PROMPTS, settings(4))) == want
    assert want != ids(ProxyEngine(base, tok).generate(PROMPTS, settings(4)))  # the adapter matters


# ---------------------------------------------------------------------------- training every family

@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_with_trl(zoo, family, method, tmp_path):
    """Two steps of SFT, DPO (full) and SFT with LoRA (default targets: every linear layer), merged."""
    from helpers import FIXTURES, make_cfg

    from core.registry import read_card
    from training import dpo, sft

    model = zoo[family].anti
    if method == "dpo":
        cfg = make_cfg("dpo", model, tmp_path, "+task=jsonl", f"task.path={FIXTURES / 'pairs.jsonl'}", steps=2)
        metrics = dpo.run(cfg)
    else:
        peft = ["peft=lora"] if method == "lora" else []
        cfg = make_cfg("sft", model, tmp_path, "+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}", *peft, steps=2)
        metrics = sft.run(cfg)
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["last_loss"]))
    tuned, before = load_model(metrics["path"]), load_model(model)
    tok = load_tokenizer(metrics["path"])
    x = tok(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        assert not torch.equal(tuned(**x).logits, before(**x).logits)
    assert read_card(metrics["path"]).tuned_from == model


# ---------------------------------------------------------------------------- how a chat expert reads prompts

def _cfg(base, expert, anti, expert_format=None):
    from omegaconf import OmegaConf

    none = {"dtype": None, "quantization": None, "device_map": None, "attn_implementation": None}
    return OmegaConf.create({"base": base, "expert": expert, "anti_expert": anti,
                             "load": {"base": none, "expert": none, "anti_expert": none},
                             "proxy": {"alpha": 1.0, "expert_format": expert_format, "extra_pairs": []}})


def test_a_chat_expert_steered_against_its_base_reads_a_user_turn(zoo, capsys):
    from proxy.build import build_engine

    f = zoo["llama3"]
    engine_, _ = build_engine(_cfg(f.base, f.expert, f.anti))
    assert engine_.pairs[0].expert_format == CHAT
    assert "chat model" in capsys.readouterr().err
    raw, _ = build_engine(_cfg(f.base, f.expert, f.anti, expert_format="{prompt}"))
    assert raw.pairs[0].expert_format == "{prompt}"
    plain, _ = build_engine(_cfg(zoo["pythia"].base, zoo["pythia"].expert, zoo["pythia"].anti))
    assert plain.pairs[0].expert_format is None  # no chat template: raw prompts


def test_the_paper_s_chat_expert_preset_reads_a_user_turn():
    from proxy.build import ResolvedPair, expert_format

    pair = ResolvedPair("llama2-7b-chat", "llama2-7b", 1.0, None, "llama2-7b-chat")
    assert expert_format(pair, None, None, None, None) == CHAT


# ---------------------------------------------------------------------------- continuous batching

def live_outputs(engine_, prompts, settings_, join_after: int = 3) -> list[list[int]]:
    """The rows' generated ids when the second half of the prompts joins the running batch after a few
    steps, and rows leave as they end (the server's way of batching)."""
    from proxy.batcher import LiveBatch, Request

    out: dict[int, list[int]] = {}
    requests = []
    for i, p in enumerate(prompts):
        request = Request(prompt=p, settings=settings_, listener=lambda e, i=i: out.setdefault(i, []).append(e))
        request.encoded = engine_.encode_prompt(p, settings_.max_new_tokens)
        requests.append(request)
    half = len(requests) // 2
    live = LiveBatch(engine_)
    live.admit(requests[:half])
    steps = 0
    while live.rows or steps <= join_after:
        if steps == join_after:
            live.admit(requests[half:])
        for listener, event in live.step() if live.rows else []:
            listener(event)
        steps += 1
    ids = []
    for i in range(len(prompts)):
        tokens = [e["token_id"] for e in out[i] if e["type"] == "token"]
        end = next(e for e in out[i] if e["type"] == "end")
        ids.append(tokens[:-1] if end["finish_reason"] == "eos" else tokens)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_joining_and_leaving_a_running_batch_decode_as_alone(loaded, family):
    f = loaded(family)
    eng = ProxyEngine(f.model["base"], f.tok["base"], f.pair())
    prompts = PROMPTS + PROMPTS[::-1]
    want = ids(eng.generate(prompts, settings(1)))
    assert live_outputs(eng, prompts, settings(1)) == want
