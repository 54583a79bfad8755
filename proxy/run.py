"""Proxy-decode a base with a tuned expert and its anti-expert.

    python -m proxy.run expert=<checkpoint folder or registered name> base=<preset, path or hub id> prompts=p.jsonl
    python -m proxy.run -m proxy.alpha=0,0.5,1 expert=... prompts=...       # a sweep

Writes generations.jsonl (one record per prompt) in the run folder and logs the run to W&B.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from core.errors import UserError, exit_on_user_error
from core.files import read_jsonl, write_jsonl
from core.jobs import CHECKPOINT_FILE, Checkpoint, hydra_output_dir, run_job
from proxy.build import build_engine, resolve_pairs, run_inputs
from proxy.options import generation_settings


def read_prompts(cfg: DictConfig) -> list[str]:
    if not cfg.get("prompts"):
        raise UserError("no prompts given: pass prompts=<JSONL file with a \"prompt\" field per line>")
    return [str(r["prompt"]) for r in read_jsonl(cfg.prompts, required=["prompt"])]


def run(cfg: DictConfig, out_dir: str | None = None) -> dict[str, Any]:
    """Decode the prompts; write generations.jsonl into out_dir; return the run's metrics."""
    out_dir = out_dir or hydra_output_dir()
    if not cfg.get("expert"):
        raise UserError("no expert given: pass expert=<checkpoint folder or registered name>")
    pairs = resolve_pairs(cfg)
    out_path = Path(out_dir) / "generations.jsonl"
    digest = run_inputs(cfg, pairs, cfg.get("prompts"))

    def decode(tracker) -> dict[str, Any]:
        settings = generation_settings(cfg.generation)
        prompts = read_prompts(cfg)
        engine, _ = build_engine(cfg, pairs)
        checkpoint = Checkpoint(Path(out_dir) / CHECKPOINT_FILE, cfg, digest)  # an interrupted run goes on from it
        gens = engine.generate(prompts, settings, diagnostics=cfg.proxy.diagnostics, checkpoint=checkpoint)
        records = [{"prompt": g.prompt, "generation": g.text, "finish_reason": g.finish_reason,
                    **({"diagnostics": g.diagnostics} if cfg.proxy.diagnostics else {})} for g in gens]
        write_jsonl(out_path, records)
        checkpoint.remove()
        stats = engine.last_stats
        metrics = {"num_prompts": len(prompts), "new_tokens": stats.new_tokens, "seconds": round(stats.seconds, 3),
                   "alpha": pairs[0].alpha, "anti_expert": pairs[0].anti_expert, **stats.metrics()}
        tracker.summary(metrics)
        tracker.table("generations", [{k: r[k] for k in ("prompt", "generation")} for r in records])
        print(f"wrote {len(records)} generations to {out_path}")
        return metrics

    return run_job(cfg, out_dir, "proxy", digest, str(out_path), decode)


@hydra.main(config_path="../conf", config_name="proxy", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return run(cfg).get("tokens_per_s", 0.0)


if __name__ == "__main__":
    main()
