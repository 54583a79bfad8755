"""Proxy decoding: one KV cache per model, each fed only the new token after the prompt.

At every step the next-token scores are `s_base + sum_i alpha_i * (s_expert_i - s_anti_i)` (see
`proxy.combine`); transformers' logits processors and stopping criteria do the rest.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import (
    DynamicCache,
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinNewTokensLengthLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from proxy.combine import proxy_logits, token_diagnostics
from proxy.errors import UserError
from proxy.loading import model_device
from proxy.prompts import CHAT, render
from proxy.vocab import shared_vocab_size


@dataclass
class SteeringPair:
    """An expert and the model it was tuned from, pulling the base by `alpha`."""

    expert: torch.nn.Module
    anti_expert: torch.nn.Module
    alpha: float = 1.0
    expert_format: str | None = None  # how the expert sees the prompt (see proxy.prompts.render)
    name: str = "expert"
    shared: bool = False  # expert and anti-expert are one SharedLoraPair: its logits are [expert | anti]
    tokenizer: object = None  # the expert's own tokenizer: its chat template renders the expert's prompt


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is masked until this many tokens are out
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = 0
    stop: Sequence[str] = ()
    batch_size: int = 8


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    diagnostics: list[dict] | None = None


@dataclass
class DecodeStats:
    """Counters over one `generate` call."""

    new_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    changed_tokens: int = 0
    diagnosed_tokens: int = 0
    row_forwards: int = 0  # base forwards summed over the rows they served (prefill included)
    drafted: int = 0  # speculative decoding: drafts proposed and accepted
    accepted: int = 0
    per_model_forwards: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def base_forwards_per_token(self) -> float | None:
        return self.row_forwards / self.new_tokens if self.new_tokens else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def changed_share(self) -> float | None:
        return self.changed_tokens / self.diagnosed_tokens if self.diagnosed_tokens else None


def check_alpha(alpha: float) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise UserError(f"alpha must be a number, got {alpha!r}; try proxy.alpha=1.0") from None
    if not math.isfinite(alpha):
        raise UserError(f"alpha must be a finite number, got {alpha}; try proxy.alpha=1.0")
    return alpha


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, rows aligned on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded mask: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


class ModelStream:
    """One model reading one rendering of the prompts, with its own KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = model_device(model)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None
        self.dense = False  # no padding and no holes: the model's own causal mask is the right one
        self.forwards = 0

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, last: int = 1) -> torch.Tensor:
        """Run the prompts; return the last position's logits (B, V), or the last `last` positions' (B, last, V)."""
        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask.to(self.device)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask,
            position_ids=positions_from_mask(self.mask),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=last,
        )
        self.next_pos = self.mask.sum(-1, keepdim=True)
        self.dense = bool(self.mask.all())
        self.forwards += 1
        return out.logits[:, -1] if last == 1 else out.logits[:, -last:]

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed n new tokens per row (B, n) at the next logical positions; return their logits (B, n, V)."""
        tokens = tokens.to(self.device)
        n = tokens.shape[1]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1]).expand(-1, n)], dim=-1)
        positions = self.next_pos + torch.arange(n, device=self.device)
        out = self.model(
            input_ids=tokens,
            attention_mask=None if self.dense else self.mask,  # None spares building a mask per forward
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.next_pos = self.next_pos + n
        self.forwards += 1
        return out.logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B,); return the next logits (B, V)."""
        return self.feed(tokens[:, None])[:, -1]

    @torch.inference_mode()
    def keep(self, fed: int, valid: torch.Tensor) -> None:
        """Of the last `fed` slots, keep the first `valid[r]` of each row (B,) and roll back the rest.

        Rows keep different numbers, so a rejected slot stays in the cache masked out (a hole the
        attention mask hides); the tail that no row keeps is cropped from the cache."""
        if fed == 0:
            return
        valid = valid.to(self.device)
        keep = torch.arange(fed, device=self.device)[None, :] < valid[:, None]
        self.mask[:, -fed:] = keep.to(self.mask.dtype)
        self.next_pos = self.next_pos - fed + valid[:, None]
        drop = fed - int(valid.max())
        if drop > 0:
            self.cache.crop(-drop)
            self.mask = self.mask[:, :-drop]
        self.dense = self.dense and bool(self.mask.all())


def logits_processors(settings: GenerationSettings, prompt_width: int, eos_id: int | None) -> LogitsProcessorList:
    """transformers' own processors over the proxy scores: constraints always, warpers when sampling."""
    procs = LogitsProcessorList()
    if settings.min_new_tokens and eos_id is not None:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_width, settings.min_new_tokens, eos_id))
    if not settings.do_sample:
        return procs
    if settings.temperature is not None and settings.temperature != 1.0:
        if settings.temperature <= 0:
            raise UserError("generation.temperature must be > 0 when sampling; use do_sample=false for greedy")
        procs.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        procs.append(TopKLogitsWarper(int(settings.top_k)))
    if settings.top_p is not None and settings.top_p < 1.0:
        procs.append(TopPLogitsWarper(float(settings.top_p)))
    return procs


class ProxyEngine:
    """Decode from `base` steered by zero or more (expert, anti-expert) pairs.

    The base and anti-experts read the raw prompt; each expert reads its own rendering of it
    (`SteeringPair.expert_format`). Generated tokens are appended to every model's sequence.
    A model passed in more than one role with the same rendering runs once per step.
    """

    def __init__(self, base, tokenizer, pairs: Sequence[SteeringPair] = (), tokenizers: dict | None = None,
                 parallel: bool = False):
        self.base = base
        self.tokenizer = tokenizer
        self.pairs = list(pairs)
        for pair in self.pairs:
            pair.alpha = check_alpha(pair.alpha)
            if pair.shared and pair.expert_format not in (None, "{prompt}"):
                raise UserError("a shared LoRA pair reads one rendering of the prompt: drop proxy.expert_format")
        roles = {"base": tokenizer, **(tokenizers or {})}
        widths = {"base": base.get_output_embeddings().weight.shape[0]}
        for pair in self.pairs:
            widths[f"expert '{pair.name}'"] = pair.expert.get_output_embeddings().weight.shape[0]
            widths[f"anti-expert of '{pair.name}'"] = pair.anti_expert.get_output_embeddings().weight.shape[0]
        self.vocab_size = shared_vocab_size(roles, widths)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.device = model_device(base)
        self.last_stats = DecodeStats()
        # a format is rendered by the tokenizer of the expert that reads it (a chat template is the expert's)
        self.renderers = {p.expert_format: p.tokenizer for p in self.pairs if p.expert_format and p.tokenizer}
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}
        self.parallel = parallel and bool(self.pairs)  # the small models in a second process (proxy.parallel)
        self._worker = None

    def _small_model_worker(self, streams, base_key):
        """The forked process that runs every stream but the base's, started at the first batch."""
        if self._worker is None:
            from proxy.parallel import ParallelStreams

            self._worker = ParallelStreams({k: m for k, m in streams.items() if k != base_key}, self.vocab_size)
        return self._worker

    def close(self) -> None:
        """Stop the small-model worker, if one was started (also when __init__ failed half-way)."""
        if getattr(self, "_worker", None) is not None:
            self._worker.close()
            self._worker = None

    def __del__(self):
        self.close()

    def stop_criteria(self, stop: Sequence[str]) -> StopStringCriteria | None:
        """transformers' stop-string matcher, built once per set of strings (it embeds the whole vocabulary)."""
        if not stop:
            return None
        key = tuple(stop)
        if key not in self._stop_criteria:
            self._stop_criteria[key] = StopStringCriteria(self.tokenizer, list(stop))
        return self._stop_criteria[key]

    # -- streams ----------------------------------------------------------------------------------
    def _stream_plan(self):
        """Distinct (model, prompt format) streams, and for each pair the keys of its two streams."""
        streams: dict[tuple, torch.nn.Module] = {}

        def key_for(model, fmt):
            key = (id(model), fmt or None)
            streams.setdefault(key, model)
            return key

        base_key = key_for(self.base, None)
        pair_keys = []
        for p in self.pairs:
            expert_key = key_for(p.expert, p.expert_format)
            pair_keys.append((expert_key, expert_key if p.shared else key_for(p.anti_expert, None)))
        return streams, base_key, pair_keys

    def encode(self, prompt: str, fmt: str | None) -> list[int]:
        text = render(prompt, fmt, self.renderers.get(fmt, self.tokenizer))
        return self.tokenizer(text, add_special_tokens=fmt != CHAT)["input_ids"]

    def _context_limit(self, model) -> int | None:
        return getattr(model.config, "max_position_embeddings", None)

    def _check_lengths(self, streams, encoded, prompts, extra: int) -> None:
        for key, model in streams.items():
            limit = self._context_limit(model)
            if limit is None:
                continue
            for i, ids in enumerate(encoded[key]):
                if len(ids) + extra > limit:
                    raise UserError(
                        f"prompt {i} ({prompts[i][:40]!r}...) is {len(ids)} tokens; with {extra} new tokens it "
                        f"exceeds the model's context of {limit}; shorten it or lower generation.max_new_tokens"
                    )

    def combine(self, logits: dict, base_key, pair_keys) -> torch.Tensor:
        offsets = []
        for p, (e, a) in zip(self.pairs, pair_keys):
            if p.shared:  # one stream whose logits are [expert | anti-expert]
                width = logits[e].shape[-1] // 2
                offsets.append((p.alpha, logits[e][..., :width], logits[e][..., width:]))
            else:
                offsets.append((p.alpha, logits[e], logits[a]))
        return proxy_logits(logits[base_key], offsets, self.vocab_size)

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], settings: GenerationSettings | None = None, diagnostics: bool = False
    ) -> list[Generation]:
        settings = settings or GenerationSettings()
        if settings.max_new_tokens < 1:
            raise UserError("generation.max_new_tokens must be at least 1")
        stats = DecodeStats()
        generator = None
        if settings.do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(settings.seed or 0))
        start = time.perf_counter()
        out: list[Generation] = []
        batch_size = max(1, int(settings.batch_size))
        for i in range(0, len(prompts), batch_size):
            out += self._generate_batch(list(prompts[i : i + batch_size]), settings, diagnostics, generator, stats)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return out

    def _generate_batch(self, prompts, settings, diagnostics, generator, stats) -> list[Generation]:
        streams, base_key, pair_keys = self._stream_plan()
        encoded = {key: [self.encode(p, key[1]) for p in prompts] for key in streams}
        self._check_lengths(streams, encoded, prompts, settings.max_new_tokens)
        worker = self._small_model_worker(streams, base_key) if self.parallel else None
        local = {base_key: streams[base_key]} if worker else streams
        runners = {key: ModelStream(model) for key, model in local.items()}
        padded = {key: left_pad(encoded[key], self.pad_id) for key in streams}
        logits = worker.prefill(padded) if worker else {}
        for key, runner in runners.items():
            logits[key] = runner.prefill(*padded[key])
        base_ids = padded[base_key][0]
        prompt_width = base_ids.shape[1]
        seq = base_ids.to(self.device)

        processors = logits_processors(settings, prompt_width, self.eos_id)
        length_done = MaxLengthCriteria(max_length=prompt_width + settings.max_new_tokens)
        eos_done = EosTokenCriteria(eos_token_id=self.eos_id) if self.eos_id is not None else None
        stop_done = self.stop_criteria(settings.stop)

        batch = len(prompts)
        stats.row_forwards += batch
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        reasons = ["length"] * batch
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        trace: list[list[dict]] = [[] for _ in range(batch)]
        while True:
            scores = self.combine(logits, base_key, pair_keys)
            picked = processors(seq, scores) if processors else scores
            if settings.do_sample:
                probs = torch.softmax(picked, dim=-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_tokens = picked.argmax(-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, self.pad_id))
            if diagnostics:
                self._record(trace, unfinished, next_tokens, logits[base_key], scores, stats)
            seq = torch.cat([seq, next_tokens[:, None]], dim=-1)
            lengths += unfinished.long()
            stats.new_tokens += int(unfinished.sum())
            stats.steps += 1
            for reason, crit in (("eos", eos_done), ("stop", stop_done), ("length", length_done)):
                if crit is None:
                    continue
                hit = crit(seq, scores).to(self.device) & unfinished
                for row in hit.nonzero().flatten().tolist():
                    reasons[row] = reason
                unfinished &= ~hit
            if not unfinished.any():
                break
            stats.row_forwards += int(unfinished.sum())
            if worker:
                worker.submit(next_tokens)  # the small models step while the base does
            logits = {key: runner.step(next_tokens) for key, runner in runners.items()}
            if worker:
                logits.update(worker.collect())

        for key, runner in runners.items():
            name = "base" if key == base_key else f"stream{list(runners).index(key)}"
            stats.per_model_forwards[name] = stats.per_model_forwards.get(name, 0) + runner.forwards
        return [
            self._finish(prompt, seq[row, prompt_width : prompt_width + int(lengths[row])].tolist(),
                         reasons[row], settings.stop, trace[row] if diagnostics else None)
            for row, prompt in enumerate(prompts)
        ]

    def _record(self, trace, unfinished, next_tokens, base_logits, scores, stats) -> None:
        diag = token_diagnostics(base_logits[:, : self.vocab_size].float(), scores)
        rows = unfinished.nonzero().flatten().tolist()
        for row in rows:
            trace[row].append(
                {
                    "token_id": int(next_tokens[row]),
                    "base_top_id": int(diag["base_top"][row]),
                    "proxy_top_id": int(diag["proxy_top"][row]),
                    "base_top": self.tokenizer.convert_ids_to_tokens(int(diag["base_top"][row])),
                    "proxy_top": self.tokenizer.convert_ids_to_tokens(int(diag["proxy_top"][row])),
                    "changed": bool(diag["changed"][row]),
                    "offset_norm": round(float(diag["offset_norm"][row]), 4),
                    "kl_proxy_base": round(float(diag["kl_proxy_base"][row]), 5),
                }
            )
        stats.diagnosed_tokens += len(rows)
        stats.changed_tokens += int(diag["changed"][unfinished].sum())

    def _finish(self, prompt, new_ids, reason, stop, trace) -> Generation:
        kept = new_ids[:-1] if reason == "eos" else new_ids
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if reason == "stop":
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return Generation(prompt=prompt, text=text, token_ids=kept, finish_reason=reason, diagnostics=trace)

    # -- scoring ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8) -> list[dict]:
        """Log-likelihood of each continuation after its prompt under the proxy distribution.

        Returns, per pair, {"logprob": sum over the continuation's tokens, "num_tokens", "is_greedy"}.
        The continuation's tokens are those that `prompt + continuation` adds to `prompt`'s encoding.
        """
        if len(prompts) != len(continuations):
            raise UserError("score() needs as many continuations as prompts")
        results = []
        for i in range(0, len(prompts), batch_size):
            results += self._score_batch(prompts[i : i + batch_size], continuations[i : i + batch_size])
        return results

    def continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        whole = self.tokenizer(prompt + continuation)["input_ids"]
        head = self.tokenizer(prompt)["input_ids"]
        if whole[: len(head)] != head:  # the join merged tokens across the boundary
            return self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return whole[len(head):]

    def _score_batch(self, prompts, continuations) -> list[dict]:
        streams, base_key, pair_keys = self._stream_plan()
        conts = [self.continuation_ids(p, c) for p, c in zip(prompts, continuations)]
        if any(len(c) == 0 for c in conts):
            raise UserError("a continuation to score encodes to no tokens")
        span = max(len(c) for c in conts)
        logits = {}
        for key, model in streams.items():
            rows = [self.encode(p, key[1]) + c for p, c in zip(prompts, conts)]
            ids, mask = left_pad(rows, self.pad_id)
            device = model_device(model)
            mask = mask.to(device)
            out = model(
                input_ids=ids.to(device), attention_mask=mask, position_ids=positions_from_mask(mask),
                logits_to_keep=span + 1,
            )
            # right-aligned rows: position -(n+1) predicts the continuation's first token in every stream
            logits[key] = out.logits[:, -(span + 1) : -1]
        scores = self.combine(logits, base_key, pair_keys)  # (B, span, V)
        logprobs = torch.log_softmax(scores, dim=-1)
        results = []
        for row, cont in enumerate(conts):
            n = len(cont)
            target = torch.tensor(cont, device=logprobs.device)
            lp = logprobs[row, span - n :]
            token_lp = lp.gather(-1, target[:, None]).squeeze(-1)
            results.append(
                {
                    "logprob": float(token_lp.sum()),
                    "num_tokens": n,
                    "is_greedy": bool((lp.argmax(-1) == target).all()),
                }
            )
        return results
