"""Evaluate a model, or a proxy configuration, on a task split.

    python -m eval.run +task=triviaqa model=<checkpoint or registered name>            # a model alone
    python -m eval.run +task=triviaqa base=llama2-13b expert=<registered name>         # proxy-tuned
    python -m eval.run -m +task=tinyworld base=tiny-large expert=tiny-expert proxy.alpha=0.5,1,1.5

Writes predictions.jsonl and metrics.json in the run folder, logs to W&B, records a registered
model's score on its card, and returns the task's metric (what an Optuna sweep maximises).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from core.errors import UserError, exit_on_user_error
from core.files import atomic_write_json, write_jsonl
from core.jobs import CHECKPOINT_FILE, Checkpoint, hydra_output_dir, run_job
from core.registry import display_name, is_url, update_scores
from eval import metrics as M
from proxy.build import build_engine, resolve_pairs, run_inputs
from proxy.options import check_plausibility, generation_settings
from training.tasks import get_field, load_records, load_task, task_files, to_example

METRICS_FILE = "metrics.json"


def task_of(cfg: DictConfig) -> DictConfig:
    if not cfg.get("task"):
        raise UserError("no task given: pass +task=<name> (one of conf/task/*.yaml), e.g. +task=triviaqa")
    return load_task(cfg.task)


def describe(cfg: DictConfig, pairs) -> dict[str, Any]:
    """What was evaluated, in the words the report reads back."""
    if not pairs:
        return {"role": "model", "model": str(cfg.base)}
    first = pairs[0]
    k = (cfg.proxy.get("speculative") or {}).get("k")
    options = [str(cfg.load.base.get("quantization") or ""), "shared pair" if cfg.proxy.get("shared_pair") else "",
               served_variant(cfg) if is_url(cfg.base) else "",
               f"speculative k={k}" if k is not None else "",
               f"plausibility {check_plausibility(cfg.proxy.plausibility):g}" if cfg.proxy.get("plausibility") else ""]
    model = (cfg.load.base.get("model") or display_name(cfg.base)) if is_url(cfg.base) else str(cfg.base)
    return {"role": "proxy", "model": model, "expert": first.name, "anti_expert": first.anti_expert,
            "alpha": first.alpha, "variant": ", ".join(o for o in options if o) or None}


def served_variant(cfg: DictConfig) -> str:
    """A served base's row: its top K and the rule for the tokens outside them, where set."""
    k, outside = cfg.load.base.get("top_logprobs"), cfg.load.base.get("outside")
    return "served" + (f", top {k}" if k else "") + (f", outside {outside}" if outside else "")


def score_generation_task(engine, task, examples, settings, diagnostics: bool, checkpoint: Checkpoint | None = None):
    gens = engine.generate([e["prompt"] for e in examples], settings, diagnostics=diagnostics, checkpoint=checkpoint)
    rows = []
    for e, g in zip(examples, gens):
        rows.append({"prompt": e["prompt"], "generation": g.text, "answers": e["answers"],
                     "score": M.score(task.metric, g.text, e["answers"], list(task.get("stop") or []))})
    return rows


def score_multiple_choice(engine, task, records):
    """MC1: the choice with the highest log-likelihood under the proxy distribution."""
    rows = []
    for rec in records:
        prompt = to_example(task, rec, "eval")["prompt"] if task.get("prompt_template") else str(rec["prompt"])
        choices = [str(c) for c in get_field(rec, task.choices_field)]
        labels = list(get_field(rec, task.labels_field))
        if 1 not in labels:
            raise UserError(f"task '{task.name}': a record has no correct choice (label 1) in {task.labels_field}")
        fmt = task.get("choice_template", " {choice}")
        scored = engine.score([prompt] * len(choices), [fmt.replace("{choice}", c) for c in choices])
        lls = [s["logprob"] for s in scored]
        rows.append({"prompt": prompt, "choices": choices, "loglikelihoods": lls,
                     "prediction": choices[M.mc1_choice(lls)], "score": M.mc1(lls, labels.index(1))})
    return rows


def evaluate(cfg: DictConfig, out_dir: str | None = None) -> dict[str, Any]:
    out_dir = out_dir or hydra_output_dir()
    if cfg.get("model") and cfg.get("expert"):
        raise UserError(f"give model= (a model alone) or base= with expert= (a proxy-tuned base), not both: "
                        f"model={cfg.model} expert={cfg.expert}")
    if cfg.get("model"):
        with open_dict(cfg):
            cfg.base, cfg.expert = cfg.model, None
    task = task_of(cfg)
    pairs = resolve_pairs(cfg)

    digest = run_inputs(cfg, pairs, *task_files(task))

    def score(tracker) -> dict[str, Any]:
        engine, _ = build_engine(cfg, pairs)
        checkpoint = Checkpoint(Path(out_dir) / CHECKPOINT_FILE, cfg, digest)  # an interrupted run goes on from it
        rows = task_rows(cfg, task, engine, pairs, checkpoint)
        result = {task.metric: M.mean(r["score"] for r in rows), "num_examples": len(rows),
                  **engine.last_stats.metrics()}
        record = {"task": task.name, "split": eval_split(task), "metric": task.metric, **describe(cfg, pairs),
                  "metrics": result}
        write_jsonl(Path(out_dir) / "predictions.jsonl", rows)
        atomic_write_json(Path(out_dir) / METRICS_FILE, record)
        checkpoint.remove()
        tracker.summary(result)
        tracker.table("predictions", [{k: r.get(k) for k in ("prompt", "generation", "prediction", "score")}
                                      for r in rows[:200]])
        if not pairs:
            # a checkpoint's score is the whole split's: a run over the first records (task.limit) is not it
            if not task.get("limit"):
                update_scores(str(cfg.base), f"{task.name}:{eval_split(task)}", {task.metric: result[task.metric],
                                                                       "num_examples": len(rows)})
        print(f"{task.name} {task.metric} = {result[task.metric]:.4f} over {len(rows)} examples "
              f"({record['role']}); wrote {Path(out_dir) / METRICS_FILE}")
        return record

    return run_job(cfg, out_dir, "eval", digest, str(Path(out_dir) / METRICS_FILE), score)


def eval_split(task: DictConfig) -> str:
    return str(task.get("eval_split") or task.get("split") or "train")


def task_rows(cfg: DictConfig, task: DictConfig, engine, pairs, checkpoint: Checkpoint | None = None
              ) -> list[dict[str, Any]]:
    """Every evaluation example of the task, scored: by log-likelihood (MC1) or by generating."""
    if task.metric == "mc1":
        return score_multiple_choice(engine, task, load_records(task, "eval"))
    settings = generation_settings(cfg.generation)
    settings.stop = list(task.get("stop") or [])
    diagnostics = bool(cfg.proxy.diagnostics) and bool(pairs) and not cfg.proxy.get("speculative", {}).get("k")
    examples = [to_example(task, r, "eval", where=f"record {i + 1}") for i, r in enumerate(load_records(task, "eval"))]
    return score_generation_task(engine, task, examples, settings, diagnostics, checkpoint)


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    record = evaluate(cfg)
    return float(record["metrics"][record["metric"]])


if __name__ == "__main__":
    main()
