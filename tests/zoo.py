"""A zoo of tiny random checkpoints, built in code in seconds, that carry the quirks of the model families
people proxy-tune: their tokenizers (the family's own transformers tokenizer class, over a BPE trained
here), special tokens, generation configs, cache types, vocabulary padding and chat templates.

Every family has a large base, a small base (the anti-expert) and a small "tuned" expert (other random
weights; for families with chat models, the instruct variant: its own EOS, chat template and generation
config). Random models rarely end a sequence, so each checkpoint is given a stop token that it prefers
over some frequent token (`_prefer`): decoding then ends mid-way, at an id the run must recognise.

    families = build_zoo(tmp_path)        # {name: Family}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Where was Ada born?\nAnswer: Ada was born in Highmoor.",
    "Proxy tuning steers a large model with a small tuned expert and its anti-expert.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" - ( )",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "What is the capital of France? Paris is the capital of France.",
] * 20
PROMPTS = [
    "The quick brown",
    "Question: Where was Ada born?\nAnswer:",
    "Write a short poem about",
    "a b c d",
]

LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
              "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TULU_CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
             "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class Family:
    name: str
    base: str  # the large base
    anti: str  # the small base: the expert's anti-expert
    expert: str  # the small tuned model (the instruct variant where the family has one)
    chat: bool  # the expert reads prompts through its chat template
    instruct_base: str | None = None  # a large instruct model (its generation config has extras)
    lora_targets: list[str] = field(default_factory=list)  # the family's attention projections
    notes: str = ""


# ------------------------------------------------------------------------------------------ tokenizers

def _bpe(pre_tokenizer, vocab_size: int = 320) -> tuple[dict, list]:
    """vocab and merges of a BPE trained on CORPUS with the given pre-tokenizer."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    alphabet = sorted({ch for line in CORPUS for ch in line})
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                                        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _with_specials(specials: list[str], vocab: dict, extra: list[str] = ()) -> dict:
    """specials first (ids 0..), then the trained vocabulary, then `extra` (e.g. byte-fallback tokens)."""
    out = {t: i for i, t in enumerate(specials)}
    for t in list(extra) + sorted(vocab, key=vocab.get):
        out.setdefault(t, len(out))
    return out


def _metaspace_bpe():
    from tokenizers import pre_tokenizers

    # trained on words (as sentencepiece is: no piece crosses a "▁"), used on whole text by the tokenizer classes
    return _bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True))


def _bytelevel_bpe():
    from tokenizers import pre_tokenizers

    return _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))


BYTES = [f"<0x{b:02X}>" for b in range(256)]


def llama2_tokenizer(added: list[str] = (), chat_template: str | None = None, eos: str = "</s>"):
    """Llama-2 / Mistral: Metaspace BPE with byte fallback, <s> prepended, no pad token."""
    from transformers import LlamaTokenizer

    vocab, merges = _metaspace_bpe()
    tok = LlamaTokenizer(vocab=_with_specials(["<unk>", "<s>", "</s>"], vocab, BYTES), merges=merges,
                         add_bos_token=True)
    if added:
        tok.add_special_tokens({"additional_special_tokens": list(added)})
    if eos != "</s>":
        tok.eos_token = eos
    tok.chat_template = chat_template
    return tok


def llama3_tokenizer(instruct: bool):
    """Llama-3: byte-level BPE, <|begin_of_text|> prepended; the instruct tokenizer's EOS is <|eot_id|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>"]
    vocab, merges = _bytelevel_bpe()
    vocab = _with_specials([], vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    bos = core.token_to_id("<|begin_of_text|>")
    core.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                        special_tokens=[("<|begin_of_text|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>" if instruct else "<|end_of_text|>")
    tok.chat_template = LLAMA3_CHAT if instruct else None
    return tok


def qwen2_tokenizer():
    """Qwen2.5: byte-level BPE, no BOS, <|endoftext|> as pad; ChatML tokens in base and instruct alike."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _bytelevel_bpe()
    tok = Qwen2Tokenizer(vocab=_with_specials([], vocab), merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def gemma_tokenizer(instruct: bool):
    """Gemma-2: <pad>=0 <eos>=1 <bos>=2, <bos> prepended, turn markers in every variant."""
    from transformers import GemmaTokenizer

    vocab, merges = _metaspace_bpe()
    tok = GemmaTokenizer(vocab=_with_specials(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], vocab, BYTES),
                         merges=merges, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_CHAT if instruct else None
    return tok


def neox_tokenizer(pad: bool):
    """GPT-NeoX / Pythia (BOS == EOS == <|endoftext|>, nothing prepended) and OLMo (with <|padding|>)."""
    from transformers import GPTNeoXTokenizer

    vocab, merges = _bytelevel_bpe()
    specials = ["<|endoftext|>", "<|padding|>"] if pad else ["<|endoftext|>"]
    tok = GPTNeoXTokenizer(vocab=_with_specials(specials, vocab), merges=merges,
                           pad_token="<|padding|>" if pad else None)
    if not pad:
        tok.pad_token = None
    return tok


def wordlevel_tokenizer():
    """A word-level tokenizer (whitespace-split words, no merges): what transformers' stop-string matcher chokes on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in CORPUS for w in line.split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# ------------------------------------------------------------------------------------------ models

def _config(kind: str, tok, hidden: int, layers: int, vocab_size: int | None = None, **extra):
    from transformers import (
        Gemma2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OlmoConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                  initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if kind == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common, **extra)
    if kind == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False, **common, **extra)
    if kind == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common, **extra)
    if kind == "gemma2":
        return Gemma2Config(num_key_value_heads=2, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            **{**common, "initializer_range": 0.05}, **extra)
    if kind == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                             **common, **extra)
    if kind == "olmo":
        return OlmoConfig(num_key_value_heads=4, tie_word_embeddings=False, clip_qkv=None, **common, **extra)
    raise ValueError(kind)


def _model(config, seed: int, tokens: int | None = None):
    """A random model; embedding rows past the tokenizer's `tokens` (vocabulary padding) are zero, as
    untrained rows are near zero in real checkpoints, so they never win an argmax."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if tokens is not None:
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                emb.weight[tokens:] = 0
    return model


@torch.no_grad()
def _prefer(model, tok, stop_id: int, seed: int) -> None:
    """Make the model emit `stop_id` wherever it would emit one of its frequent greedy tokens, so that
    decoding ends part-way (the output row of stop_id becomes that token's, scaled up a little)."""
    head = model.get_output_embeddings().weight
    counts: dict[int, int] = {}
    texts = [(p, True) for p in PROMPTS]
    if tok.chat_template:  # what the model reads as an expert
        texts += [(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True), False) for p in PROMPTS]
    for text, special in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=special)["input_ids"]
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        for t in out[0, ids.shape[1]:].tolist()[2:]:
            counts[t] = counts.get(t, 0) + 1
    ranked = sorted((c, t) for t, c in counts.items() if t != stop_id)
    if not ranked:
        return
    target = ranked[-(1 + seed % min(2, len(ranked)))][1]
    head[stop_id] = head[target] * 1.05
    if getattr(model.config, "final_logit_softcapping", None) is None:
        return
    head[stop_id] = head[target] * 1.2  # softcapping flattens the margin


def _generation_config(model, eos, pad=None, bos=None, **extra):
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **extra)


def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _trio(kind, base_tok, expert_tok, root: Path, name: str, stop_base: int, stop_expert: int,
          gen_base: dict, gen_expert: dict, vocab_size=None, expert_vocab_size=None, seed=0, **cfg):
    """Save base (large), anti (small) and expert (small, other weights) of one family; their paths."""
    paths = {}
    for role, tok, hidden, layers, s, stop, gen, vsize in (
            ("base", base_tok, 48, 2, seed, stop_base, gen_base, vocab_size),
            ("anti", base_tok, 32, 2, seed + 1, stop_base, gen_base, vocab_size),
            ("expert", expert_tok, 32, 2, seed + 2, stop_expert, gen_expert, expert_vocab_size or vocab_size)):
        model = _model(_config(kind, tok, hidden, layers, vsize, **cfg), s, len(tok))
        _generation_config(model, **gen)
        _prefer(model, tok, stop, s)
        paths[role] = _save(model, tok, root / name / role)
    return paths


def _instruct(kind, tok, gen: dict, stop: int, folder: Path, seed: int, vocab_size=None) -> str:
    """A large instruct model (its generation config's extras are what the base's `generate` must honour)."""
    model = _model(_config(kind, tok, 48, 2, vocab_size), seed, len(tok))
    _generation_config(model, **gen)
    _prefer(model, tok, stop, seed)
    return _save(model, tok, folder / "instruct")


def build_zoo(root: Path) -> dict[str, Family]:
    root = Path(root)
    fams: dict[str, Family] = {}

    # Llama-2 (base) with Llama-2-chat style expert: the same tokenizer, [INST] chat template
    tok = llama2_tokenizer()
    chat_tok = llama2_tokenizer(chat_template=INST)
    p = _trio("llama", tok, chat_tok, root, "llama2", 2, 2, dict(bos=1, eos=2), dict(bos=1, eos=2))
    fams["llama2"] = Family("llama2", p["base"], p["anti"], p["expert"], chat=True,
                            lora_targets=["q_proj", "v_proj"], notes="Metaspace BPE, BOS, no pad")

    # Llama-3: base EOS <|end_of_text|>; instruct EOS <|eot_id|>, generation config ends on three ids
    base_tok, inst_tok = llama3_tokenizer(False), llama3_tokenizer(True)
    eot, eom, eot_base = (inst_tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
    bos = base_tok.bos_token_id
    inst_gen = dict(bos=bos, eos=[eot_base, eom, eot], do_sample=True, temperature=0.6, top_p=0.9)
    p = _trio("llama", base_tok, inst_tok, root, "llama3", eot_base, eom, dict(bos=bos, eos=eot_base), inst_gen)
    fams["llama3"] = Family("llama3", p["base"], p["anti"], p["expert"], chat=True,
                            instruct_base=_instruct("llama", inst_tok, inst_gen, eom, root / "llama3", seed=7),
                            lora_targets=["q_proj", "v_proj"],
                            notes="several EOS ids, base/instruct EOS differ, chat template")

    # Mistral-7B-v0.1: sliding-window attention (window 8 here), Llama-2 tokenizer
    tok = llama2_tokenizer()
    p = _trio("mistral", tok, llama2_tokenizer(chat_template=INST), root, "mistral", 2, 2,
              dict(bos=1, eos=2), dict(bos=1, eos=2))
    fams["mistral"] = Family("mistral", p["base"], p["anti"], p["expert"], chat=True,
                             lora_targets=["q_proj", "v_proj"], notes="sliding window")

    # Qwen2.5: vocabulary padded past the tokenizer, tied embeddings, ChatML; instruct adds <|im_end|>
    # to its EOS and a repetition penalty
    tok = qwen2_tokenizer()
    inst_tok = qwen2_tokenizer()
    inst_tok.eos_token = "<|im_end|>"
    endoftext, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    padded = (len(tok) // 64 + 2) * 64
    inst_gen = dict(eos=[im_end, endoftext], pad=endoftext, do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                    repetition_penalty=1.05)
    p = _trio("qwen2", tok, inst_tok, root, "qwen2", endoftext, im_end, dict(eos=endoftext, pad=endoftext),
              inst_gen, vocab_size=padded)
    fams["qwen2"] = Family("qwen2", p["base"], p["anti"], p["expert"], chat=True,
                           instruct_base=_instruct("qwen2", inst_tok, inst_gen, im_end, root / "qwen2", seed=8,
                                                   vocab_size=padded),
                           lora_targets=["q_proj", "v_proj"],
                           notes="padded vocabulary, tied embeddings, ChatML, repetition penalty")

    # Gemma-2: sliding and global layers, logit soft-capping; -it ends turns with <end_of_turn>
    tok, inst_tok = gemma_tokenizer(False), gemma_tokenizer(True)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    p = _trio("gemma2", tok, inst_tok, root, "gemma2", 1, eot, dict(bos=2, eos=1, pad=0),
              dict(bos=2, eos=[1, eot], pad=0))
    fams["gemma2"] = Family("gemma2", p["base"], p["anti"], p["expert"], chat=True,
                            lora_targets=["q_proj", "v_proj"], notes="sliding + global layers, soft-capping")

    # GPT-NeoX / Pythia: BOS == EOS, nothing prepended, no pad token
    tok = neox_tokenizer(pad=False)
    p = _trio("gpt_neox", tok, tok, root, "pythia", 0, 0, dict(bos=0, eos=0), dict(bos=0, eos=0))
    fams["pythia"] = Family("pythia", p["base"], p["anti"], p["expert"], chat=False,
                            lora_targets=["query_key_value"], notes="bos == eos, fused qkv")

    # OLMo
    tok = neox_tokenizer(pad=True)
    p = _trio("olmo", tok, tok, root, "olmo", 0, 0, dict(eos=0, pad=1), dict(eos=0, pad=1))
    fams["olmo"] = Family("olmo", p["base"], p["anti"], p["expert"], chat=False,
                          lora_targets=["q_proj", "v_proj"], notes="non-parametric layer norm")

    # Tulu-2 style: a Llama-2 expert whose tokenizer added a pad token (one vocabulary row more), text markers
    tok = llama2_tokenizer()
    tulu_tok = llama2_tokenizer(chat_template=TULU_CHAT)
    tulu_tok.add_special_tokens({"pad_token": "<pad>"})
    p = _trio("llama", tok, tulu_tok, root, "tulu", 2, 2, dict(bos=1, eos=2), dict(bos=1, eos=2, pad=len(tok)),
              expert_vocab_size=len(tok) + 1)
    fams["tulu"] = Family("tulu", p["base"], p["anti"], p["expert"], chat=True,
                          lora_targets=["q_proj", "v_proj"], notes="expert vocabulary one row larger")

    # ChatML on a Mistral vocabulary: the expert's role and end-of-turn markers are tokens only it has
    tok = llama2_tokenizer()
    chatml_tok = llama2_tokenizer(added=["<|im_start|>", "<|im_end|>"], chat_template=CHATML, eos="<|im_end|>")
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    p = _trio("mistral", tok, chatml_tok, root, "chatml", 2, im_end, dict(bos=1, eos=2), dict(bos=1, eos=im_end),
              expert_vocab_size=len(chatml_tok))
    fams["chatml"] = Family("chatml", p["base"], p["anti"], p["expert"], chat=True,
                            lora_targets=["q_proj", "v_proj"], notes="chat tokens added to the expert only")

    # a word-level vocabulary (whole words, no merges): what transformers' stop-string matcher refuses
    tok = wordlevel_tokenizer()
    p = _trio("llama", tok, tok, root, "wordlevel", 2, 2, dict(bos=1, eos=2), dict(bos=1, eos=2))
    fams["wordlevel"] = Family("wordlevel", p["base"], p["anti"], p["expert"], chat=False,
                               lora_targets=["q_proj", "v_proj"], notes="word-level tokenizer")
    return fams
