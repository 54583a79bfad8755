"""A tiny model family built offline in seconds: one byte-level BPE tokenizer, a small and a large Llama.

Paths are handed to the code under test, exactly as a user would hand checkpoint folders.
"""
from __future__ import annotations

import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# W&B lists every installed package into each run (half a second a run): useful to users, not to tests
os.environ.setdefault("WANDB_X_SAVE_REQUIREMENTS", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and two OpenMP threads on a busy 2-core machine
# spin against each other (measured: 30-100x slower forwards).
torch.set_num_threads(1)

CORPUS = [
    " the quick brown fox jumps over the lazy dog.",
    " Question: where was the person born?\nAnswer: the person was born in a city.",
    " a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    " proxy tuning steers a large model with a small tuned expert and its anti-expert.",
] * 20
OTHER_CORPUS = [" completely different words make another vocabulary: zebra quartz fjord nymph.", " xyzzy plugh"] * 20


def tiny_tokenizer(corpus, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>",
        model_max_length=256,
    )


def tiny_llama(tokenizer, hidden, layers, seed, vocab_size=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        # a wide init makes the random models' logits peaked, so greedy choices have clear margins
        initializer_range=0.3, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@dataclass
class TinyFamily:
    root: Path
    small: str  # the anti-expert: what the expert was "tuned" from
    expert: str  # the small model with other weights (stands in for a tuned checkpoint)
    large: str  # the base
    padded_expert: str  # the expert with its embedding matrix padded past the tokenizer
    foreign: str  # a small model with a different tokenizer


def save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> TinyFamily:
    root = tmp_path_factory.mktemp("tiny_family")
    tok = tiny_tokenizer(CORPUS)
    small = tiny_llama(tok, 32, 2, seed=0)
    expert = tiny_llama(tok, 32, 2, seed=1)
    large = tiny_llama(tok, 64, 4, seed=2)
    padded = tiny_llama(tok, 32, 2, seed=1, vocab_size=len(tok) + 13)
    with torch.no_grad():  # same function as `expert` on the real vocabulary; padding rows are noise
        for name, param in padded.named_parameters():
            src = dict(expert.named_parameters())[name]
            param[: src.shape[0]].copy_(src)
    other_tok = tiny_tokenizer(OTHER_CORPUS)
    foreign = tiny_llama(other_tok, 32, 2, seed=3)
    return TinyFamily(
        root=root,
        small=save(small, tok, root / "small"),
        expert=save(expert, tok, root / "expert"),
        large=save(large, tok, root / "large"),
        padded_expert=save(padded, tok, root / "padded_expert"),
        foreign=save(foreign, other_tok, root / "foreign"),
    )


def pytest_collection_modifyitems(items):
    """The slow tests first: spread over `pytest -n 2` workers from the start, none is left for the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session):
    """Every library the tests use is imported by now: keep its objects out of the garbage collector's
    scans. The Trainer runs a full `gc.collect()` as each training starts (accelerate's free_memory),
    which costs ~0.5 s in a process holding torch, transformers, TRL and lm-eval; frozen, milliseconds."""
    import gc

    gc.freeze()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Tiny random checkpoints of every family people proxy-tune (tests/zoo.py), built once per run: under
    `pytest -n`, the first worker to need them builds them and the others read the same folders."""
    from zoo import build_zoo

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_zoo(tmp_path_factory.mktemp("zoo"))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "zoo"  # the run's folder, which every worker shares
    built = root / "families.pickle"
    with FileLock(f"{root}.lock"):
        if not built.exists():
            built.write_bytes(pickle.dumps(build_zoo(root)))
    return pickle.loads(built.read_bytes())


@pytest.fixture(scope="session")
def models(tiny_family):
    """The family loaded once for the session (eval mode, no grad): the tokenizer and three models."""
    from core.loading import load_model, load_tokenizer

    return {
        "tok": load_tokenizer(tiny_family.large),
        "large": load_model(tiny_family.large),
        "small": load_model(tiny_family.small),
        "expert": load_model(tiny_family.expert),
    }


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return [
        " the quick brown",
        " Question: where was the person born?\nAnswer:",
        " a b c",
        " proxy tuning steers a large model with a small",
    ]


@pytest.fixture(autouse=True)
def isolated_registry(tmp_path_factory, monkeypatch):
    """Each test its own registry: nothing a test registers is seen by another, or by the user's."""
    path = tmp_path_factory.mktemp("registry") / "registry.json"
    monkeypatch.setenv("PROXY_REGISTRY", str(path))
    return path


@pytest.fixture(scope="session", autouse=True)
def checkout_left_alone():
    """No test writes into the checkout's own run folders (the user's outputs/, multirun/, wandb/): each
    writes under its tmp_path. Fails at the end of the run, naming what appeared."""
    from helpers import ROOT as root

    folders = [root / name for name in ("outputs", "multirun", "wandb")]

    def paths() -> set[Path]:
        return {p for folder in folders if folder.exists() for p in folder.rglob("*")}

    before = paths()
    yield
    new = sorted(str(p.relative_to(root)) for p in paths() - before)
    assert not new, f"tests wrote into the checkout: {new[:5]}"
