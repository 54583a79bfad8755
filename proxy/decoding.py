"""The rules of one decoding call (proxy.step applies them): which scores are processed how
(transformers' own logits processors, built from the base's generation config and the user's settings,
exactly as the base's `generate` builds them), how a token is picked, and when a row ends.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    MinPLogitsWarper,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from core.errors import UserError
from proxy.text import StopStrings

# processors that read neither the ids nor their number: one call serves rows at any position
POSITION_FREE = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper,
                 EpsilonLogitsWarper, EtaLogitsWarper, SuppressTokensLogitsProcessor, InfNanRemoveLogitsProcessor)
OWN_FIELDS = ("seed", "stop", "batch_size", "config")  # the rest are GenerationConfig fields


@dataclass
class GenerationSettings:
    """What the user asks of one decoding call. A None field keeps the base's generation config (as the
    base's own `generate` would); `config` passes any other `GenerationConfig` field."""

    max_new_tokens: int = 64
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = 0
    stop: Sequence[str] = ()
    batch_size: int = 8
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # a bare string is one stop string, not one per character
        self.stop = [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or ()) if s]
        for name, low in (("max_new_tokens", 1), ("min_new_tokens", 0), ("top_k", 0), ("seed", None), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low)):
                raise UserError(f"generation.{name} must be a whole number" + (f" of at least {low}" if low else "")
                                + f", got {value!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"generation.{name} must be a number, got {value!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # transformers ignores one above 1 silently
            raise UserError(f"generation.top_p must lie in (0, 1], got {self.top_p!r}")

    def overrides(self) -> dict[str, Any]:
        """The GenerationConfig fields the user set."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in OWN_FIELDS}
        return {**{k: v for k, v in own.items() if v is not None}, **dict(self.config or {})}


def generation_config(base, settings: GenerationSettings, stop_ids: Sequence[int], pad_id: int) -> GenerationConfig:
    """The base's generation config with the user's settings on top, as `generate` merges them; it ends
    on every id in `stop_ids`. UserError for a setting transformers refuses."""
    overrides = settings.overrides()
    unknown = sorted(k for k in overrides if not hasattr(GenerationConfig(), k))
    if unknown:
        raise UserError(f"unknown generation setting(s) {unknown}; see transformers' GenerationConfig for the names")
    if overrides.get("do_sample") and overrides.get("temperature") is not None and overrides["temperature"] <= 0:
        raise UserError("generation.temperature must be > 0 when sampling; use do_sample=false for greedy")
    try:
        gc, _ = base._prepare_generation_config(None, **overrides)  # transformers' own merge
    except ValueError as err:
        raise UserError(f"bad generation setting: {str(err).strip().splitlines()[0]}") from None
    if gc.num_beams not in (None, 1):
        raise UserError("beam search is not supported by proxy decoding; leave num_beams at 1")
    gc.eos_token_id = list(stop_ids)
    if gc.pad_token_id is None:
        gc.pad_token_id = pad_id
    return gc


class DecodeRules:
    """transformers' processors and the stopping rules of one call: the pieces of one decoding step."""

    def __init__(self, base, settings: GenerationSettings, stop_ids: Sequence[int], pad_id: int, tokenizer,
                 device):
        if settings.max_new_tokens is None or settings.max_new_tokens < 1:
            raise UserError("generation.max_new_tokens must be at least 1")
        self.base = base
        self.settings = settings
        self.config = generation_config(base, settings, stop_ids, pad_id)
        self.device = device
        self.do_sample = bool(self.config.do_sample)
        self.max_new_tokens = int(settings.max_new_tokens)
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.stop_strings = StopStrings(tokenizer, settings.stop)
        self.generator = None
        if self.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(settings.seed or 0))
        try:  # transformers checks the values (top_p in (0, 1], ...) as it builds them: refuse them now
            probe = self.processors(torch.ones(1, 1, dtype=torch.long))
        except ValueError as err:
            raise UserError(f"bad generation setting: {str(err).strip().splitlines()[0]}") from None
        self.processes = bool(probe)  # some processor changes the scores
        # nothing reads the ids or their number: `probe` serves rows at any position in one call
        self.position_free = all(isinstance(p, POSITION_FREE) for p in probe)
        self.probe = probe

    def processors(self, prompt_mask: torch.Tensor) -> LogitsProcessorList:
        """The processors the base's `generate` would build for these left-padded prompts (B, W)."""
        gc = copy.deepcopy(self.config)
        self.base._prepare_special_tokens(gc, True, device=self.device)  # the stop ids as tensors
        return self.base._get_logits_processor(
            generation_config=gc, input_ids_seq_length=prompt_mask.shape[1],
            model_kwargs={"attention_mask": prompt_mask.to(self.device)}, device=self.device)

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """Greedy or sampled tokens (B,) from processed scores (B, V)."""
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, -1), 1, generator=self.generator).squeeze(1)
        return scores.argmax(-1)

    def finish_reason(self, new_ids: Sequence[int]) -> str | None:
        """Why a row whose generated ids are `new_ids` has ended, or None if it goes on."""
        if new_ids and new_ids[-1] in self.config.eos_token_id:
            return "eos"
        if self.stop_strings and self.stop_strings.hit(new_ids):
            return "stop"
        if len(new_ids) >= self.max_new_tokens:
            return "length"
        return None
