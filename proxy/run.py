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
from proxy.jobs import hydra_output_dir, mark_finished, skip_if_finished
from proxy.loading import PRESET_DIR, load_model, load_tokenizer, resolve_spec


def looks_like_hub_id(name: str) -> bool:
    """owner/name that is not a local path, or a preset (which names a hub id)."""
    return (PRESET_DIR / f"{name}.yaml").exists() or (
        name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists())
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
        if card is None and not Path(str(expert)).expanduser().is_dir() and not looks_like_hub_id(str(expert)):
            from training.registry import entries

            known = ", ".join(sorted(entries())) or "none yet"
            raise UserError(
                f"expert '{expert}' is neither a checkpoint folder nor a registered name (registered: {known}); "
                "train one with python -m training.sft, or pass a folder and anti_expert=<what it was tuned from>"
            )
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
    """The configured (expert, anti-expert) pairs; none when no expert is set (the base alone)."""
    if not cfg.get("expert"):
        return []
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
    """Load the base and every expert/anti-expert (each once), check their tokenizers, build the engine:
    the plain one, or the speculative one with `proxy.speculative.k`; with `proxy.shared_pair`, an
    unmerged LoRA expert serves as its own anti-expert (one small model)."""
    pairs = resolve_pairs(cfg)
    base_spec = resolve_spec(cfg.base, cfg.load.base)
    tokenizer = load_tokenizer(base_spec)
    base = load_model(base_spec)
    shared = bool(cfg.proxy.get("shared_pair")) and len(pairs) > 0
    specs = {}
    for p in pairs[1:] if shared else pairs:
        specs[p.expert] = resolve_spec(p.expert, cfg.load.expert)
        specs.setdefault(p.anti_expert, resolve_spec(p.anti_expert, cfg.load.anti_expert))
    own_tokenizers = {name: load_tokenizer(spec) for name, spec in specs.items()}
    tokenizers = {f"model '{name}'": tok for name, tok in own_tokenizers.items()}
    models = {name: load_model(spec) for name, spec in specs.items()}
    steering = []
    for i, p in enumerate(pairs):
        if shared and i == 0:
            from proxy.shared_pair import adapter_tokenizer, load_shared_pair

            tokenizers[f"expert '{p.name}' (shared pair)"] = adapter_tokenizer(p.expert)
            pair_model = load_shared_pair(p.expert)
            steering.append(SteeringPair(pair_model, pair_model, p.alpha, p.expert_format, p.name, shared=True))
        else:
            steering.append(SteeringPair(models[p.expert], models[p.anti_expert], p.alpha, p.expert_format, p.name,
                                         tokenizer=own_tokenizers[p.expert]))
    k = (cfg.proxy.get("speculative") or {}).get("k")
    if k is not None and steering:
        from proxy.speculative import SpeculativeProxyEngine

        return SpeculativeProxyEngine(base, tokenizer, steering, tokenizers=tokenizers, k=k,
                                      parallel=bool(cfg.proxy.get("parallel"))), pairs
    return ProxyEngine(base, tokenizer, steering, tokenizers=tokenizers, parallel=bool(cfg.proxy.get("parallel"))), pairs


def read_prompts(cfg: DictConfig) -> list[str]:
    if not cfg.get("prompts"):
        raise UserError("no prompts given: pass prompts=<JSONL file with a \"prompt\" field per line>")
    return [str(r["prompt"]) for r in read_jsonl(cfg.prompts, required=["prompt"])]


def run(cfg: DictConfig, out_dir: str | None = None) -> dict[str, Any]:
    """Decode the prompts; write generations.jsonl into out_dir; return the run's metrics."""
    out_dir = out_dir or hydra_output_dir()
    done = skip_if_finished(out_dir, cfg, str(Path(out_dir) / "generations.jsonl"))
    if done is not None:
        return done
    if not cfg.get("expert"):
        raise UserError("no expert given: pass expert=<checkpoint folder or registered name>")
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
        for key in ("changed_share", "acceptance_rate", "base_forwards_per_token"):
            if getattr(stats, key) is not None:
                metrics[key] = round(getattr(stats, key), 4)
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
