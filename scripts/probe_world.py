"""Measures whether the embedded world gives proxy-tuning a real gap to close.

    python -m scripts.probe_world --out /tmp/probe --seed 0

Builds the family, fully fine-tunes the small and the large base on the train split with
TRL's SFTTrainer (prompt/completion records: completion-only loss, EOS appended), then on
held-out people reports greedy exact match of: small base, small expert, large base, large
directly tuned, and the proxy-tuned large at several alphas, plus the gap closed
(proxy - large base) / (large tuned - large base). The three-model loop here is a
hand-written probe; the project's decoding engine lives in proxy/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from trl import SFTConfig, SFTTrainer

from training import world as world_lib
from training.family import build_family

MAX_NEW_TOKENS = 16
ALPHAS = (0.5, 1.0, 1.5, 2.0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sft(base_path: Path, train_records: list[dict], out_path: Path, lr: float, epochs: float,
        batch_size: int) -> float:
    """Full fine-tuning; returns seconds taken. Skips if out_path already holds a model."""
    if (out_path / "config.json").exists():
        return 0.0
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in train_records])
    config = SFTConfig(
        output_dir=str(out_path) + ".trainer",
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=world_lib.SFT_WARMUP_RATIO,
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        max_length=128,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(out_path)
    tokenizer.save_pretrained(out_path)
    return time.time() - started


@torch.no_grad()
def greedy(tokenizer, base, prompts: list[str], expert=None, anti_expert=None, alpha: float = 0.0,
           batch_size: int = 100) -> list[str]:
    """Greedy decoding of base + alpha * (expert - anti_expert) logits, one KV cache per model.
    Returns each generation cut at EOS or the first newline."""
    models = [base] if expert is None else [base, expert, anti_expert]
    newline_ids = torch.tensor([i for i in range(len(tokenizer))
                                if "\n" in tokenizer.decode([i])])
    eos = tokenizer.eos_token_id
    texts = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False)
        mask = enc.attention_mask
        step_ids = enc.input_ids
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [DynamicCache() for _ in models]
        done = torch.zeros(len(step_ids), dtype=torch.bool)
        generated = []
        for _ in range(MAX_NEW_TOKENS):
            logits = [m(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                        past_key_values=c, use_cache=True).logits[:, -1].float()
                      for m, c in zip(models, caches)]
            scores = logits[0] if len(logits) == 1 else logits[0] + alpha * (logits[1] - logits[2])
            next_ids = scores.argmax(-1).masked_fill(done, eos)
            generated.append(next_ids)
            done |= (next_ids == eos) | torch.isin(next_ids, newline_ids)
            if done.all():
                break
            step_ids = next_ids[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
        for row in torch.stack(generated, dim=1).tolist():
            if eos in row:
                row = row[:row.index(eos)]
            texts.append(tokenizer.decode(row).split("\n")[0])
    return texts


def exact_match(generations: list[str], records: list[dict]) -> float:
    hits = sum(g.strip() in [a.strip() for a in r["answers"]] for g, r in zip(generations, records))
    return hits / len(records)


def cloze_recall(tokenizer, model, world, split: str) -> float:
    """Does a base complete the answer sentence's fact in pretraining style? ("X was born in")"""
    prompts, values = [], []
    for person in world.people_in(split):
        for relation in world_lib.RELATIONS:
            sentence = world_lib.answer_sentence(person, relation)
            value = person.fact(relation)
            prompts.append(" " + sentence[: sentence.rindex(value)].rstrip())
            values.append(value)
    outputs = greedy(tokenizer, model, prompts)
    return sum(o.strip().startswith(v) for o, v in zip(outputs, values)) / len(values)


def load(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/probe_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default="full")
    parser.add_argument("--small-lr", type=float, default=world_lib.SFT_SMALL_LEARNING_RATE)
    parser.add_argument("--large-lr", type=float, default=world_lib.SFT_LARGE_LEARNING_RATE)
    parser.add_argument("--epochs", type=float, default=world_lib.SFT_SMALL_EPOCHS,
                        help="epochs of the small expert's SFT")
    parser.add_argument("--large-epochs", type=float, default=world_lib.SFT_LARGE_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=world_lib.SFT_BATCH_SIZE)
    parser.add_argument("--tag", default="default", help="names the SFT outputs, to compare settings")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two multi-threaded torch jobs on 2 cores slow each other ~20x

    out = Path(args.out)
    started = time.time()
    paths = build_family(out / "family", seed=args.seed, scale=args.scale)
    build_seconds = time.time() - started
    family = json.loads(paths["family_json"].read_text())
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])

    sft_seconds = {}
    tuned = {}
    large_epochs = args.large_epochs
    for name, lr, epochs in (("small", args.small_lr, args.epochs),
                             ("large", args.large_lr, large_epochs)):
        tuned[name] = out / f"{name}-sft-{args.tag}"
        sft_seconds[name] = round(sft(paths[name], train, tuned[name], lr, epochs, args.batch_size), 1)

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    small_base, large_base = load(paths["small"]), load(paths["large"])
    small_expert, large_tuned = load(tuned["small"]), load(tuned["large"])
    prompts = [r["prompt"] for r in test]

    world = world_lib.make_world(args.seed, family["settings"]["n_people"])
    results = {
        "cloze_recall_test": {"small_base": cloze_recall(tokenizer, small_base, world, "test"),
                              "large_base": cloze_recall(tokenizer, large_base, world, "test")},
        "exact_match_test": {},
    }
    em = results["exact_match_test"]
    samples = {}
    for name, model in (("small_base", small_base), ("small_expert", small_expert),
                        ("large_base", large_base), ("large_tuned", large_tuned)):
        generations = greedy(tokenizer, model, prompts)
        em[name] = exact_match(generations, test)
        samples[name] = generations[:3]
    t0 = time.time()
    for alpha in ALPHAS:
        generations = greedy(tokenizer, large_base, prompts, small_expert, small_base, alpha)
        em[f"proxy_alpha_{alpha}"] = exact_match(generations, test)
        samples[f"proxy_alpha_{alpha}"] = generations[:3]
    proxy_seconds_per_alpha = (time.time() - t0) / len(ALPHAS)

    gap = em["large_tuned"] - em["large_base"]
    results["gap_closed"] = {f"alpha_{a}": (em[f"proxy_alpha_{a}"] - em["large_base"]) / gap
                             if gap > 0 else None for a in ALPHAS}
    results.update({
        "test_questions": len(test),
        "seed": args.seed,
        "sft": {"small_lr": args.small_lr, "large_lr": args.large_lr, "epochs": args.epochs,
                "large_epochs": large_epochs, "batch_size": args.batch_size, "seconds": sft_seconds},
        "family_build_seconds": family.get("build_seconds"),
        "this_run_build_or_cache_seconds": round(build_seconds, 1),
        "proxy_decode_seconds_per_alpha": round(proxy_seconds_per_alpha, 1),
        "samples": {"answers": [r["answers"][0] for r in test[:3]], **samples},
    })
    text = json.dumps(results, indent=2)
    (out / f"probe-{args.tag}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
