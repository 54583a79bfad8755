"""Proxy-decode a base with a tuned expert and its anti-expert.

    python -m proxy.run expert=<checkpoint folder or registered name> base=<preset, path or hub id> prompts=p.jsonl
    python -m proxy.run -m proxy.alpha=0,0.5,1 expert=... prompts=...       # a sweep

Writes generations.jsonl (one record per prompt) in the run folder and logs the run to W&B.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair, check_alpha
from proxy.errors import UserError, exit_on_user_error
from proxy.io import read_jsonl, write_jsonl
from proxy.jobs import finished_result, hydra_output_dir, mark_finished
from proxy.loading import load_model, load_tokenizer, resolve_spec
from proxy.tracking import tracked


@dataclass
class ResolvedPair:
    """One expert as the user named it, with what its card (if any) says about it."""

    expert: str  # folder, hub id or preset to load
    anti_expert: str
    alpha: float
    expert_format: str | None
    name: str
    card: Any = None


def resolve_pair(expert: str, anti_expert: str | None, alpha: float, expert_format: str | None) -> ResolvedPair:
    """Fill the anti-expert and the expert's prompt format from the expert's registry card."""
    from training.registry import resolve

    if not expert or expert == "???":
        raise UserError("no expert given: pass expert=<checkpoint folder or registered name>")
    path, card = resolve(expert)
    if anti_expert is None:
        if card is None:
            raise UserError(
                f"expert '{expert}' has no registry card saying what it was tuned from; "
                "pass anti_expert=<the model it was tuned from>"
            )
        anti_expert = card.tuned_from
    if expert_format is None and card is not None:
        expert_format = card.prompt_format
    return ResolvedPair(path, str(anti_expert), check_alpha(alpha), expert_format, name=str(expert), card=card)


def resolve_pairs(cfg: DictConfig) -> list[ResolvedPair]:
    pairs = [resolve_pair(cfg.expert, cfg.anti_expert, cfg.proxy.alpha, cfg.proxy.expert_format)]
    for extra in cfg.proxy.extra_pairs or []:
        pairs.append(resolve_pair(extra.expert, extra.get("anti_expert"), extra.get("alpha", 1.0),
                                  extra.get("expert_format")))
    return pairs


def generation_settings(gen: DictConfig) -> GenerationSettings:
    data = OmegaConf.to_container(gen, resolve=True)
    data["stop"] = list(data.get("stop") or [])
    return GenerationSettings(**data)


def build_engine(cfg: DictConfig) -> tuple[ProxyEngine, list[ResolvedPair]]:
    """Load the base and every expert/anti-expert (each once), check their tokenizers, build the engine."""
    pairs = resolve_pairs(cfg)
    base_spec = resolve_spec(cfg.base, cfg.load.base)
    specs = {}
    for p in pairs:
        specs[p.expert] = resolve_spec(p.expert, cfg.load.expert)
        specs.setdefault(p.anti_expert, resolve_spec(p.anti_expert, cfg.load.anti_expert))
    tokenizer = load_tokenizer(base_spec)
    tokenizers = {f"model '{name}'": load_tokenizer(spec) for name, spec in specs.items()}
    base = load_model(base_spec)
    models = {name: load_model(spec) for name, spec in specs.items()}
    steering = [
        SteeringPair(models[p.expert], models[p.anti_expert], p.alpha, p.expert_format, p.name) for p in pairs
    ]
    return ProxyEngine(base, tokenizer, steering, tokenizers=tokenizers), pairs


def read_prompts(cfg: DictConfig) -> list[str]:
    if not cfg.get("prompts"):
        raise UserError("no prompts given: pass prompts=<JSONL file with a \"prompt\" field per line>")
    return [str(r["prompt"]) for r in read_jsonl(cfg.prompts, required=["prompt"])]


def run(cfg: DictConfig, out_dir: str | None = None) -> dict[str, Any]:
    """Decode the prompts; write generations.jsonl into out_dir; return the run's metrics."""
    out_dir = out_dir or hydra_output_dir()
    done = finished_result(out_dir, cfg)
    if done is not None:
        print(f"already done, skipping: {Path(out_dir) / 'generations.jsonl'}")
        return done
    settings = generation_settings(cfg.generation)
    prompts = read_prompts(cfg)
    with tracked(cfg, job_type="proxy", run_dir=out_dir) as tracker:
        engine, pairs = build_engine(cfg)
        gens = engine.generate(prompts, settings, diagnostics=cfg.proxy.diagnostics)
        stats = engine.last_stats
        records = []
        for g in gens:
            rec = {"prompt": g.prompt, "generation": g.text, "finish_reason": g.finish_reason}
            if cfg.proxy.diagnostics:
                rec["diagnostics"] = g.diagnostics
            records.append(rec)
        out_path = Path(out_dir) / "generations.jsonl"
        write_jsonl(out_path, records)
        metrics = {
            "num_prompts": len(prompts),
            "new_tokens": stats.new_tokens,
            "tokens_per_s": round(stats.tokens_per_s, 2),
            "seconds": round(stats.seconds, 3),
            "alpha": pairs[0].alpha,
            "anti_expert": pairs[0].anti_expert,
        }
        if stats.changed_share is not None:
            metrics["changed_share"] = round(stats.changed_share, 4)
        tracker.summary(metrics)
        tracker.table("generations", [{k: r[k] for k in ("prompt", "generation")} for r in records])
        mark_finished(out_dir, cfg, metrics)
    print(f"wrote {len(records)} generations to {out_path}")
    return metrics


@hydra.main(config_path="../conf", config_name="proxy", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return run(cfg).get("tokens_per_s", 0.0)


if __name__ == "__main__":
    main()
