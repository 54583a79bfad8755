"""The main job (`make demo`): the whole workflow on the embedded tiny family, ending in the results table.

build or reuse the family -> SFT the small model into the expert (and DPO it further) -> register ->
SFT the large model directly (the reference) -> evaluate every model and the proxy-tuned large model
over a sweep of alpha -> the gap-closed table, report.json and a plot (its path on the last line).

Every stage is composed from conf/ with the same overrides a user would type, e.g. the expert is
`python -m training.sft +task=tinyworld model=tiny-small name=tiny-expert training.learning_rate=2e-3 ...`.
Finished stages are found and skipped on a re-run.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from core import CONF_DIR, PROJECT_ROOT
from training import world

FAMILY_DIR = Path(os.environ.get("PROXY_FAMILY_DIR", PROJECT_ROOT / ".cache" / "tiny-family"))
ALPHAS = (0.5, 1.0, 1.5, 2.0)


def config(app: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=app, overrides=overrides)


def sft_overrides(size: str, name: str, out: Path) -> list[str]:
    s = world.SFT_SETTINGS
    return [
        "+task=tinyworld", f"model=tiny-{size}", f"name={name}", f"paths.outputs={out}",
        f"training.learning_rate={s[size]['learning_rate']}", f"training.num_train_epochs={s[size]['num_train_epochs']}",
        f"training.per_device_train_batch_size={s['per_device_train_batch_size']}",
        "training.gradient_accumulation_steps=1", f"training.warmup_steps={s['warmup_ratio']}",
        f"training.lr_scheduler_type={s['lr_scheduler_type']}", "training.activation_checkpointing=false",
        "training.max_length=128", "training.logging_steps=25", "training.save_steps=100",
    ]


def dpo_overrides(expert_path: str, out: Path) -> list[str]:
    return [
        "+task=tinyworld", f"model={expert_path}", "name=tiny-expert-dpo", f"paths.outputs={out}",
        "training.learning_rate=2e-4", "training.num_train_epochs=1", "training.beta=0.1",
        "training.per_device_train_batch_size=32", "training.gradient_accumulation_steps=1",
        "training.activation_checkpointing=false", "training.max_length=128", "training.logging_steps=25",
        "training.save_steps=100",
    ]


def train(app: str, overrides: list[str]) -> str:
    from training import dpo, sft

    stage = {"sft": sft, "dpo": dpo}[app]
    result = stage.run(config(app, overrides))
    return result["path"]


def evaluate(name: str, overrides: list[str], out: Path) -> None:
    from eval.run import evaluate as run_eval

    cfg = config("eval", ["+task=tinyworld", f"paths.outputs={out}", "generation.max_new_tokens=24",
                          "generation.batch_size=100", *overrides])
    run_eval(cfg, out_dir=str(out / "eval" / name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "demo"))
    parser.add_argument("--scale", default="full", choices=["full", "test"], help="test: a seconds-long smoke run")
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO expert")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds contention on 2 cores
    started = time.time()

    from training.family import build_family

    print(f"[1/5] model family in {FAMILY_DIR} (built once, then cached)")
    build_family(FAMILY_DIR, seed=0, scale=args.scale)

    print("[2/5] expert: SFT of the small base on the tuning people (full fine-tuning)")
    expert = train("sft", sft_overrides("small", "tiny-expert", out))
    experts = {"tiny-expert": expert}
    print("[2/5] a LoRA expert, left unmerged: proxy decoding can run it as its own anti-expert")
    experts["tiny-expert-lora"] = train("sft", [*sft_overrides("small", "tiny-expert-lora", out), "peft=lora",
                                                "training.merge=false", "training.learning_rate=3e-3"])
    if not args.no_dpo:
        print("[2/5] a second expert: DPO of the SFT expert on preference pairs (its anti-expert stays the small base)")
        experts["tiny-expert-dpo"] = train("dpo", dpo_overrides(expert, out))

    print("[3/5] reference: the large base tuned directly on the same data")
    train("sft", sft_overrides("large", "tiny-large-tuned", out))

    print("[4/5] evaluation on held-out people")
    for model in ("tiny-small", *experts, "tiny-large", "tiny-large-tuned"):
        evaluate(model, [f"model={model}"], out)
    for name in experts:
        for alpha in ALPHAS:
            evaluate(f"proxy-{name}-a{alpha:g}", ["base=tiny-large", f"expert={name}", f"proxy.alpha={alpha}"], out)
    evaluate("proxy-tiny-expert-a1-nf4", ["base=tiny-large", "expert=tiny-expert", "proxy.alpha=1.0",
                                          "load.base.quantization=nf4"], out)
    evaluate("proxy-tiny-expert-lora-a1-shared", ["base=tiny-large", "expert=tiny-expert-lora", "proxy.alpha=1.0",
                                                  "proxy.shared_pair=true"], out)

    print("[5/5] report")
    from eval.report import write_report

    path = write_report([out / "eval"], out / "report")
    print(f"demo finished in {time.time() - started:.0f} s")
    print(path)


if __name__ == "__main__":
    main()
