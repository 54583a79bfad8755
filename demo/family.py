"""The embedded model family: one tokenizer, a small and a large Llama pretrained on the world.

    python -m demo.family --out artifacts/family --seed 0 --scale full

The large base (~2M parameters) memorises every person's facts, held-out people included;
the small base (~0.2M) does not. Neither has seen a question. Pretraining runs by epochs,
not wall clock: memorisation has a sharp threshold in epochs (docs/tiny-world.md).

Beside it, `build_other_small` pretrains a small base of another tokenizer family on the same corpus
(a Metaspace BPE, as Llama-2's, of another size; its own special tokens), cached in <family>/other:
an expert tuned from it steers the large base through text (proxy.cross).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from tqdm.auto import tqdm
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from core.files import apply_umask, umask_mode
from demo import world as world_lib

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
MAX_LENGTH = 128

# hidden/layers/heads/ffn per scale; "test" only has to build and load in seconds.
SCALES = {
    "full": {
        "n_people": 1000,
        "vocab_size": 1024,
        "small": {"hidden": 64, "layers": 2, "heads": 4, "ffn": 256, "epochs": 16, "lr": 3e-3},
        "large": {"hidden": 192, "layers": 4, "heads": 6, "ffn": 512, "epochs": 24, "lr": 2e-3},
        "batch_size": 16,
    },
    "test": {
        "n_people": 40,
        "vocab_size": 320,
        "small": {"hidden": 16, "layers": 1, "heads": 2, "ffn": 32, "epochs": 1, "lr": 3e-3},
        # 64 wide: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 (the demo's NF4 step)
        "large": {"hidden": 64, "layers": 2, "heads": 2, "ffn": 128, "epochs": 1, "lr": 3e-3},
        "batch_size": 16,
    },
}


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus, so any text (a question's "?\\n") encodes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
        padding_side="left",  # generation pads on the left; training code sets its own side
    )


# the other family's tokenizer: sentencepiece-style words ("▁" marks a space), no byte alphabet
OTHER = {"full": {"vocab_size": 1536}, "test": {"vocab_size": 384}}


def build_other_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A Metaspace BPE (Llama-2's kind of tokenizer, without its byte fallback) over the corpus's characters
    and every printable ASCII one, with special tokens of its own."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted({ch for line in corpus for ch in line} | {chr(c) for c in range(32, 127)} | {"\n", "\t"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=MAX_LENGTH, padding_side="left")


def llama_config(size: dict, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden"],
        intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=2 * MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pack_rows(token_lists: list[list[int]], eos_id: int, max_length: int) -> list[list[int]]:
    """Greedy packing of whole documents (each followed by EOS) into rows of at most
    max_length tokens; every row starts at a document start, as a question prompt does."""
    rows, row = [], []
    for tokens in token_lists:
        doc = tokens[: max_length - 1] + [eos_id]
        if len(row) + len(doc) > max_length:
            rows.append(row)
            row = []
        row = row + doc
    if row:
        rows.append(row)
    return rows


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    corpus: list[str],
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    desc: str = "pretrain",
    pack: bool = True,
) -> list[float]:
    """Plain torch loop (faster than Trainer at this size). Returns the mean loss per epoch.

    pack=False (a model's "pack" key in SCALES) trains one document per row, as a prompt is seen:
    every document starts at position 0 and attends to nothing but itself. It memorises faster, but
    a base that never sees a biography after other text states wrong facts after a question prompt,
    hence packed by default (docs/tiny-world.md, "Packed pretraining rows").
    """
    generator = random.Random(seed)
    torch.manual_seed(seed)
    token_lists = tokenizer(corpus, add_special_tokens=False)["input_ids"]

    def make_rows(lists: list[list[int]]) -> list[list[int]]:
        if pack:
            return pack_rows(lists, tokenizer.eos_token_id, MAX_LENGTH)
        return [tokens[: MAX_LENGTH - 1] + [tokenizer.eos_token_id] for tokens in lists]

    rows_per_epoch = len(make_rows(token_lists))
    steps_per_epoch = math.ceil(rows_per_epoch / batch_size)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    # warm up over 5% of the steps, then a cosine down to a tenth of the peak
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, total_steps // 20), num_training_steps=total_steps, min_lr_rate=0.1)
    right = copy.deepcopy(tokenizer)
    right.padding_side = "right"  # the tokenizer pads left, for generation
    collate = DataCollatorForLanguageModeling(right, mlm=False)  # labels -100 on the padding
    model.train()
    epoch_losses = []
    progress = tqdm(total=total_steps, desc=desc, unit="step", mininterval=2.0)
    for _ in range(epochs):
        order = list(range(len(token_lists)))
        generator.shuffle(order)
        rows = make_rows([token_lists[i] for i in order])
        losses = []
        for start in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": row} for row in rows[start : start + batch_size]])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(1)
        epoch_losses.append(sum(losses) / len(losses))
        progress.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    progress.close()
    model.eval()
    return epoch_losses


def family_settings(seed: int, scale: str) -> dict:
    """The family's cache key: its sizes and schedule, and a digest of the world's corpus and task files."""
    world = world_lib.make_world(seed, SCALES[scale]["n_people"])
    return {"seed": seed, "scale": scale, **SCALES[scale], "max_length": MAX_LENGTH,
            "world_digest": world_lib.world_digest(world)}


def family_paths(out_dir: Path) -> dict[str, Path]:
    return {
        "root": out_dir,
        "tokenizer": out_dir / "tokenizer",
        "small": out_dir / "small",
        "large": out_dir / "large",
        "task": out_dir / "task",
        "train": out_dir / "task" / "train.jsonl",
        "test": out_dir / "task" / "test.jsonl",
        "family_json": out_dir / "family.json",
    }


def build_family(out_dir: str | Path, seed: int = 0, scale: str = "full") -> dict[str, Path]:
    """Builds (or finds cached) tokenizer, small and large bases, and task files under out_dir."""
    out_dir = Path(out_dir)
    settings = family_settings(seed, scale)
    if _cached(out_dir, settings):
        return family_paths(out_dir)

    started = time.time()

    def build(staging: Path) -> dict:
        report = _build_into(staging, settings)
        report["build_seconds"] = round(time.time() - started, 1)
        return report

    _staged(out_dir, build)
    return family_paths(out_dir)


def _staged(target: Path, build) -> None:
    """`build(folder)` into a folder beside the target, its report as the folder's family.json, then renamed
    into place: a crash never leaves a half-written folder that the cache check would accept. One torch
    thread meanwhile: these models are too small to gain from a second one, and two multi-threaded torch
    processes on two cores slow each other down ~20x (measured), e.g. beside a test run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        report = build(staging)
        (staging / "family.json").write_text(json.dumps(report, indent=2) + "\n")
        apply_umask(staging)
        os.chmod(staging, umask_mode(0o777))  # mkdtemp's folder is its owner's alone
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(threads)


def _cached(out_dir: Path, settings: dict) -> bool:
    path = out_dir / "family.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("settings") == settings
    except json.JSONDecodeError:
        return False


def _build_into(folder: Path, settings: dict) -> dict:
    seed = settings["seed"]
    world = world_lib.make_world(seed, settings["n_people"])
    corpus = world_lib.pretraining_corpus(world)
    tokenizer = build_tokenizer(corpus, settings["vocab_size"])
    tokenizer.save_pretrained(folder / "tokenizer")
    world_lib.write_task_files(world, folder / "task")

    report = {"settings": settings, "models": {}, "corpus_lines": len(corpus), "people": len(world.people)}
    for name in ("small", "large"):
        report["models"][name] = _pretrained(folder / name, settings[name], tokenizer, corpus, settings, name)
    return report


def _pretrained(folder: Path, size: dict, tokenizer, corpus: list[str], settings: dict, name: str) -> dict:
    """A Llama of `size` pretrained on the corpus and saved with its tokenizer in `folder`; its report."""
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(llama_config(size, tokenizer))
    t0 = time.time()
    losses = pretrain(model, tokenizer, corpus, epochs=size["epochs"], lr=size["lr"],
                      batch_size=settings["batch_size"], seed=settings["seed"], desc=f"pretrain {name}",
                      pack=size.get("pack", True))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"size": size, "parameters": sum(p.numel() for p in model.parameters()), "epochs": size["epochs"],
            "pretrain_seconds": round(time.time() - t0, 1), "epoch_losses": [round(x, 4) for x in losses]}


def build_other_small(family: str | Path, seed: int = 0, scale: str = "full") -> Path:
    """The small base of the other tokenizer family (cached in <family>/other/small, keyed like the family)."""
    folder = Path(family) / "other"
    settings = {**family_settings(seed, scale), "other": OTHER[scale]}
    if _cached(folder, settings):
        return folder / "small"

    def build(staging: Path) -> dict:
        world = world_lib.make_world(seed, settings["n_people"])
        corpus = world_lib.pretraining_corpus(world)
        tokenizer = build_other_tokenizer(corpus, OTHER[scale]["vocab_size"])
        return {"settings": settings,
                "small": _pretrained(staging / "small", settings["small"], tokenizer, corpus, settings, "other small")}

    _staged(folder, build)
    return folder / "small"


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    args = parser.parse_args()
    paths = build_family(args.out, seed=args.seed, scale=args.scale)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
