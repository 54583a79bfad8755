"""The engine factory every entry point calls (proxy.run, eval.run, proxy.serve, the lm-eval model): the
configured pairs resolved through the registry, every model loaded once with its own tokenizer, the
prompt format each reads, and the plain or speculative engine over them.

    engine, pairs = build_engine(cfg)      # cfg: base, expert, anti_expert, load, proxy (conf/proxy.yaml)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import GenerationConfig

from core.errors import UserError
from core.jobs import inputs_digest
from core.loading import load_model, load_tokenizer, model_paths, preset, resolve_spec
from core.registry import entries, is_url, resolve
from proxy.engine import ProxyEngine, SteeringPair
from proxy.options import check_alpha, check_proxy_options
from proxy.prompts import CHAT, chat_expected
from proxy.remote import RemoteBase
from proxy.vocab import end_ids


def looks_like_hub_id(name: str) -> bool:
    """owner/name that is not a local path, or a preset (which names a hub id)."""
    return preset(name) is not None or (
        name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists())


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
    if not expert or expert == "???":
        raise UserError("no expert given: pass expert=<checkpoint folder or registered name>")
    path, card = resolve(expert)
    if anti_expert is None:
        if card is None and not Path(str(expert)).expanduser().is_dir() and not looks_like_hub_id(str(expert)):
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


def expert_format(pair: ResolvedPair, expert_tok, anti_tok, expert_model, anti_model) -> str | None:
    """How the expert reads prompts: as its card or the user says, as its preset says, else through its
    chat template when it is a chat model steered against its base (said once on stderr), else raw."""
    fmt = pair.expert_format or (preset(pair.expert) or {}).get("prompt_format")
    if fmt is not None:
        return fmt
    if chat_expected(expert_tok, anti_tok, end_ids(expert_model, expert_tok), end_ids(anti_model, anti_tok)):
        print(f"expert '{pair.name}' is a chat model: it reads each prompt as a user turn of its chat template "
              "(proxy.expert_format='{prompt}' feeds it raw prompts)", file=sys.stderr)
        return CHAT
    return None


def check_shared_anti(cfg: DictConfig, pair: ResolvedPair, base: str) -> None:
    """A shared pair's anti-expert is the adapter's own base: an anti_expert= naming another model is refused."""
    given = cfg.get("anti_expert")
    if given and str(Path(resolve_spec(given).path).expanduser().resolve()) != str(Path(base).expanduser().resolve()):
        raise UserError(f"proxy.shared_pair runs the adapter's own base ({base}) as the anti-expert, but "
                        f"anti_expert={given}; drop anti_expert= or set proxy.shared_pair=false")


def build_engine(cfg: DictConfig, pairs: list[ResolvedPair] | None = None) -> tuple[ProxyEngine, list[ResolvedPair]]:
    """Load the base and every expert/anti-expert (each once, each placed by core.placement), with each
    model's own tokenizer, and build the engine: the plain one, or the speculative one with
    `proxy.speculative.k`; with `proxy.shared_pair`, an unmerged LoRA expert serves as its own anti-expert.
    `pairs`: the configured pairs, if already resolved."""
    check_proxy_options(cfg)
    pairs = resolve_pairs(cfg) if pairs is None else pairs
    local, served = base_options(cfg)
    base_spec = resolve_spec(cfg.base, local) if served is None else None
    tokenizer = load_tokenizer(base_spec) if base_spec else None
    shared = bool(cfg.proxy.get("shared_pair")) and len(pairs) > 0
    cross = cfg.proxy.get("cross") or {}
    roles = {}
    for p in pairs[1:] if shared else pairs:
        roles.setdefault(p.expert, ("expert", resolve_spec(p.expert, cfg.load.expert)))
        roles.setdefault(p.anti_expert, ("anti_expert", resolve_spec(p.anti_expert, cfg.load.anti_expert)))
    tokenizers = {name: load_tokenizer(spec) for name, (_, spec) in roles.items()}
    if base_spec is None:
        base = served_base(cfg, pairs, served)
        tokenizer = base.tokenizer
    else:
        base = load_model(base_spec, role="base")
    models = {name: load_model(spec, role=role) for name, (role, spec) in roles.items()}
    steering = []
    for i, p in enumerate(pairs):
        if shared and i == 0:
            from proxy.shared_pair import (
                adapter_base,
                adapter_tokenizer,
                load_shared_pair,
            )

            check_shared_anti(cfg, p, adapter_base(p.expert))
            tok = adapter_tokenizer(p.expert)
            pair_model = load_shared_pair(p.expert, cfg.load.expert.get("device_map"))
            steering.append(SteeringPair(pair_model, pair_model, p.alpha, p.expert_format, p.name, shared=True,
                                         tokenizer=tok, anti_tokenizer=tok))
            continue
        expert, anti = models[p.expert], models[p.anti_expert]
        fmt = expert_format(p, tokenizers[p.expert], tokenizers[p.anti_expert], expert, anti)
        steering.append(SteeringPair(expert, anti, p.alpha, fmt, p.name, tokenizer=tokenizers[p.expert],
                                     anti_tokenizer=tokenizers[p.anti_expert], cross=True if cross.get("force") else None))
    k = (cfg.proxy.get("speculative") or {}).get("k")
    options = {"parallel": bool(cfg.proxy.get("parallel")), "plausibility": cfg.proxy.get("plausibility") or 0.0,
               "candidates": cross.get("candidates", 16)}
    if k is not None and steering:
        from proxy.speculative import SpeculativeProxyEngine

        return SpeculativeProxyEngine(base, tokenizer, steering, k=k, **options), pairs
    engine = ProxyEngine(base, tokenizer, steering, base_format=alone_format(cfg.base, steering), **options)
    for pair in engine.pairs:
        if pair.cross and not cross.get("force"):
            print(f"expert '{pair.name}' has a tokenizer of another family than the base's: its offset is carried "
                  f"over through text, over {engine.candidates} candidate tokens a step (proxy.cross)", file=sys.stderr)
    return engine, pairs


SERVED_OPTIONS = ("model", "tokenizer", "top_logprobs", "outside", "api_key_env", "timeout", "retries")


def base_options(cfg: DictConfig) -> tuple[dict, dict | None]:
    """`load.base` split into what loads a local base and what reaches a served one (None for a local
    base, whose served options must stay unset)."""
    load = dict(cfg.load.base or {})
    served = {key: load.pop(key, None) for key in SERVED_OPTIONS}
    if is_url(cfg.base):
        return load, served
    given = [key for key, value in served.items() if value is not None]
    if given:
        raise UserError(f"load.base.{given[0]} is for a served base (base=http://HOST:PORT/v1); "
                        f"base={cfg.base} is loaded here")
    return load, None


def served_base(cfg: DictConfig, pairs: list[ResolvedPair], served: dict) -> RemoteBase:
    """The base behind an OpenAI-compatible server (`served`: its load.base options), read with a local
    tokenizer: load.base.tokenizer, else the expert's (RemoteBase checks it against the server's own)."""
    source = served["tokenizer"] or (pairs[0].expert if pairs else None)
    if source is None:
        raise UserError("a served base decoding alone needs its tokenizer: load.base.tokenizer=<folder or hub id>")
    spec = resolve_spec(str(source))
    try:
        generation_config = GenerationConfig.from_pretrained(spec.path)
    except OSError:  # none saved beside the tokenizer: the tokenizer's own special tokens
        generation_config = None
    options = {k: served[k] for k in ("timeout", "retries", "outside") if served[k] is not None}
    return RemoteBase(str(cfg.base), load_tokenizer(spec), model=served["model"], top_logprobs=served["top_logprobs"],
                      api_key_env=served["api_key_env"], generation_config=generation_config, **options)


def alone_format(base: str, steering: list) -> str | None:
    """How a model decoding alone reads prompts: as it was tuned to read them (its card's or preset's
    format: a chat expert evaluated alone reads a user turn); a steered base always reads them raw."""
    if steering:
        return None
    _, card = resolve(str(base))
    return card.prompt_format if card is not None else (preset(str(base)) or {}).get("prompt_format")


def run_inputs(cfg: DictConfig, pairs: list[ResolvedPair], *files: str | None) -> str:
    """The digest of what a run reads: the given files, every model's folder, and what the cards said."""
    models = model_paths(cfg.base, *[name for p in pairs for name in (p.expert, p.anti_expert)])
    said = [f"pair:{p.expert}|{p.anti_expert}|{p.expert_format}" for p in pairs]
    return inputs_digest([*files, *models, *said])
