"""Measures whether the embedded world gives proxy-tuning a real gap to close, with the project's own
training (training.sft) and decoding (ProxyEngine), for trying world and tuning settings quickly.

    python -m demo.probe --out /tmp/probe --seed 0

Builds the family, fully fine-tunes the small and the large base on the train split, then on held-out
people reports greedy exact match of: small base, small expert, large base, large directly tuned, and
the proxy-tuned large at several alphas, plus the gap closed (proxy - large base) / (large tuned -
large base), and how well each base completes a fact in pretraining style (cloze recall).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from core.files import read_jsonl
from core.loading import load_model, load_tokenizer
from demo import world as world_lib
from demo.family import build_family
from demo.job import config
from eval.metrics import exact_match
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from training import sft

ALPHAS = (0.5, 1.0, 1.5, 2.0)
EXPERIMENTS = {"small": "tiny-expert", "large": "tiny-large-tuned"}  # the demo's tuning of each base
GREEDY = GenerationSettings(max_new_tokens=16, do_sample=False, stop=["\n"], batch_size=100)


def tune(size: str, family: Path, out: Path, lr: float, epochs: float, batch_size: int, tag: str) -> str:
    """The demo's tuning of one base on the task's train split, with the given settings (finished runs
    are found and skipped)."""
    overrides = [f"+experiment={EXPERIMENTS[size]}", f"model={family / size}", f"name=probe-{size}-{tag}",
                 f"paths.outputs={out}", f"task.data_files.train={family / 'task' / 'train.jsonl'}",
                 f"training.learning_rate={lr}", f"training.num_train_epochs={epochs}",
                 f"training.per_device_train_batch_size={batch_size}", "training.save_steps=1000", "logger=none"]
    return sft.run(config("sft", overrides))["path"]


def decode(tok, base, prompts, expert=None, anti=None, alpha: float = 0.0) -> list[str]:
    pairs = [] if expert is None else [SteeringPair(expert, anti, alpha)]
    return [g.text for g in ProxyEngine(base, tok, pairs).generate(prompts, GREEDY)]


def cloze_recall(tok, model, world, split: str) -> float:
    """Does a base complete the answer sentence's fact in pretraining style? ("X was born in")"""
    prompts, values = [], []
    for person in world.people_in(split):
        for relation in world_lib.RELATIONS:
            sentence = world_lib.answer_sentence(person, relation)
            value = person.fact(relation)
            prompts.append(" " + sentence[: sentence.rindex(value)].rstrip())
            values.append(value)
    outputs = decode(tok, model, prompts)
    return sum(o.strip().startswith(v) for o, v in zip(outputs, values)) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default="full")
    small, large = (config("sft", [f"+experiment={EXPERIMENTS[size]}"]).training for size in ("small", "large"))
    parser.add_argument("--small-lr", type=float, default=small.learning_rate)
    parser.add_argument("--large-lr", type=float, default=large.learning_rate)
    parser.add_argument("--epochs", type=float, default=small.num_train_epochs, help="the small expert's SFT")
    parser.add_argument("--large-epochs", type=float, default=large.num_train_epochs)
    parser.add_argument("--batch-size", type=int, default=small.per_device_train_batch_size)
    parser.add_argument("--tag", default="default", help="names the SFT outputs, to compare settings")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two multi-threaded torch jobs on 2 cores slow each other ~20x

    out = Path(args.out)
    started = time.time()
    paths = build_family(out / "family", seed=args.seed, scale=args.scale)
    family = json.loads(paths["family_json"].read_text())
    test = read_jsonl(paths["test"])
    experts = {size: tune(size, out / "family", out, lr, epochs, args.batch_size, args.tag)
               for size, lr, epochs in (("small", args.small_lr, args.epochs), ("large", args.large_lr, args.large_epochs))}

    tok = load_tokenizer(paths["tokenizer"])
    small, large = load_model(paths["small"]), load_model(paths["large"])
    small_expert, large_tuned = load_model(experts["small"]), load_model(experts["large"])
    prompts = [r["prompt"] for r in test]
    world = world_lib.make_world(args.seed, family["settings"]["n_people"])

    def em(generations):
        return sum(exact_match(g, r["answers"]) for g, r in zip(generations, test)) / len(test)

    scores = {name: em(decode(tok, model, prompts)) for name, model in
              (("small_base", small), ("small_expert", small_expert), ("large_base", large), ("large_tuned", large_tuned))}
    for alpha in ALPHAS:
        scores[f"proxy_alpha_{alpha}"] = em(decode(tok, large, prompts, small_expert, small, alpha))
    gap = scores["large_tuned"] - scores["large_base"]
    results = {
        "exact_match_test": scores,
        "gap_closed": {f"alpha_{a}": (scores[f"proxy_alpha_{a}"] - scores["large_base"]) / gap if gap > 0 else None
                       for a in ALPHAS},
        "cloze_recall_test": {"small_base": cloze_recall(tok, small, world, "test"),
                              "large_base": cloze_recall(tok, large, world, "test")},
        "test_questions": len(test), "seed": args.seed, "settings": vars(args),
        "family_build_seconds": family.get("build_seconds"), "seconds": round(time.time() - started, 1),
    }
    text = json.dumps(results, indent=2)
    (out / f"probe-{args.tag}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
