"""The proxy options a user sets, each checked in one place: the pairs' strength, the plausibility
constraint, the `proxy` group as a whole, and the `generation` group (GenerationSettings)."""
from __future__ import annotations

import dataclasses
import math
import re

from omegaconf import DictConfig, OmegaConf

from core.errors import UserError
from proxy.decoding import GenerationSettings

KNOWN_PROXY_OPTIONS = {"alpha", "expert_format", "extra_pairs", "diagnostics", "speculative", "shared_pair", "parallel",
                       "plausibility", "cross"}


def check_alpha(alpha: float) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise UserError(f"alpha must be a number, got {alpha!r}; try proxy.alpha=1.0") from None
    if not math.isfinite(alpha):
        raise UserError(f"alpha must be a finite number, got {alpha}; try proxy.alpha=1.0")
    return alpha


def check_plausibility(fraction: float) -> float:
    """proxy.plausibility: 0 (every token, the paper's rule) or a fraction below 1 of a model's top probability."""
    if isinstance(fraction, bool):
        raise UserError(f"proxy.plausibility must be a number, got {str(fraction).lower()}; try proxy.plausibility=0.1")
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise UserError(f"proxy.plausibility must be a number, got {fraction!r}; try proxy.plausibility=0.1") from None
    if not 0 <= fraction < 1:
        raise UserError(f"proxy.plausibility must be at least 0 and below 1, got {fraction}; 0 turns it off, "
                        "0.1 keeps the tokens with a tenth of a model's top probability or more")
    return fraction


def check_candidates(candidates) -> int:
    """proxy.cross.candidates: how many of the base's tokens (and of the expert's) a pair of another tokenizer scores."""
    text = str(candidates)
    if isinstance(candidates, bool) or not text.isdigit() or int(text) < 1:
        raise UserError(f"proxy.cross.candidates must be a whole number of at least 1, got {candidates!r}; "
                        "try proxy.cross.candidates=16")
    return int(text)


def check_proxy_options(cfg: DictConfig) -> None:
    """The `proxy` group, refused before any model loads where an option is unknown or wrong, or two cannot
    combine (the pairs' alphas are checked as they are resolved, proxy.build.resolve_pair)."""
    unknown = sorted(set(cfg.proxy) - KNOWN_PROXY_OPTIONS)
    if unknown:
        raise UserError(f"unknown proxy option(s) {unknown}; known: {sorted(KNOWN_PROXY_OPTIONS)}")
    check_plausibility(cfg.proxy.get("plausibility") or 0.0)
    cross = cfg.proxy.get("cross") or {}
    unknown = sorted(set(cross) - {"candidates", "force"})
    if unknown:
        raise UserError(f"unknown proxy.cross option(s) {unknown}; known: ['candidates', 'force']")
    check_candidates(cross.get("candidates", 16))
    if not isinstance(cross.get("force", False), bool):
        raise UserError(f"proxy.cross.force must be true or false, got {cross.get('force')!r}")
    if cfg.proxy.get("diagnostics") and (cfg.proxy.get("speculative") or {}).get("k") is not None:
        raise UserError("proxy.diagnostics is not available with speculative decoding; turn one off")


def generation_settings(gen: DictConfig) -> GenerationSettings:
    data = OmegaConf.to_container(gen, resolve=True)
    data["config"] = dict(data.get("config") or {})
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown generation option(s) {unknown}; known: {sorted(known)} "
                        "(any other transformers GenerationConfig field goes under generation.config.<name>)")
    stop = data.get("stop")
    data["stop"] = unescape(stop) if isinstance(stop, str) else [unescape(s) for s in stop or ()]
    return GenerationSettings(**data)


def unescape(text: str) -> str:
    """A stop string as typed on a command line: \\n and \\t stand for a newline and a tab (no shell or Hydra
    override passes a real newline), \\\\ for a backslash."""
    return re.sub(r"\\\\|\\n|\\t", lambda m: {"\\\\": "\\", "\\n": "\n", "\\t": "\t"}[m.group(0)], text)
