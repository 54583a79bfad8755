"""Proxy decoding: one KV cache per model, each fed only the new token after the prompt.

One step, for a batch of rows:

    scores = s_base + sum_i alpha_i * (s_expert_i - s_anti_i)     (proxy.combine, float32)
    scores = processors(ids, scores)                             (transformers', from the base's generation config)
    token  = argmax(scores), or a sample from softmax(scores)
    a row ends on any id a model of the run ends on, on a stop string, or at its token budget

Each model reads the prompt through its own tokenizer (the expert through its own rendering: a chat
template or a format string); generated ids lie in the vocabulary all of them share, so one token is
appended to every model's sequence. A pair of another tokenizer family reads the text instead, and its
offset is scored over candidates (proxy.cross).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from core.errors import UserError
from core.jobs import Checkpoint
from proxy.combine import proxy_logits, shared_logits
from proxy.decoding import DecodeRules, GenerationSettings
from proxy.options import check_alpha, check_candidates, check_plausibility
from proxy.prompts import CHAT, RAW, Prompt, plain_text, render
from proxy.scoring import score_batch
from proxy.step import Generation, Rows, next_tokens
from proxy.streams import (
    AttentionLayout,
    left_pad,
    logit_width,
    model_device,
    open_stream,
)
from proxy.vocab import end_ids, shared_vocab_size, stop_set

__all__ = ["DecodeStats", "Generation", "GenerationSettings", "ProxyEngine", "SteeringPair"]


def is_cross(pair: SteeringPair, base_tokenizer) -> bool:
    """Whether a pair's tokenizer is of another family than the base's (their ids disagree)."""
    try:
        shared_vocab_size({"base": base_tokenizer, "expert": pair.tokenizer or base_tokenizer})
    except UserError:
        return True
    return False


@dataclass
class SteeringPair:
    """An expert and the model it was tuned from, pulling the base by `alpha`."""

    expert: torch.nn.Module
    anti_expert: torch.nn.Module
    alpha: float = 1.0
    expert_format: str | None = None  # how the expert sees the prompt (see proxy.prompts.render)
    name: str = "expert"
    shared: bool = False  # expert and anti-expert are one SharedLoraPair: its logits are [expert | anti]
    tokenizer: object = None  # the expert's own tokenizer (default: the base's)
    anti_tokenizer: object = None  # the anti-expert's own tokenizer (default: the base's)
    cross: bool | None = None  # its offset carried over through text (proxy.cross); None: where its tokenizer is
    # not the base's


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
    base_requests: int = 0  # a served base (proxy.remote): requests sent, one per row asked

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def base_forwards_per_token(self) -> float | None:
        return self.row_forwards / self.new_tokens if self.new_tokens else None

    @property
    def requests_per_token(self) -> float | None:
        return self.base_requests / self.new_tokens if self.base_requests and self.new_tokens else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def changed_share(self) -> float | None:
        return self.changed_tokens / self.diagnosed_tokens if self.diagnosed_tokens else None

    def count_forwards(self, runners: dict, base_key) -> None:
        """Add the forwards each runner (stream key -> ModelStream) made."""
        for i, (key, runner) in enumerate(runners.items()):
            name = "base" if key == base_key else f"stream{i}"
            self.per_model_forwards[name] = self.per_model_forwards.get(name, 0) + runner.forwards
            if getattr(runner, "remote", False):
                self.base_requests += runner.forwards

    def metrics(self) -> dict[str, float]:
        """What a stage reports of its decoding: speed, and the ratios that apply."""
        out = {"tokens_per_s": round(self.tokens_per_s, 2)}
        for key in ("changed_share", "acceptance_rate", "base_forwards_per_token", "requests_per_token"):
            if getattr(self, key) is not None:
                out[key] = round(getattr(self, key), 4)
        return out


@dataclass
class Stream:
    """One (model, rendering) the engine runs: how it reads the prompt and which of its ids end a turn."""

    model: torch.nn.Module
    tokenizer: object
    fmt: str | None
    ends: list[int]
    cross: bool = False  # a model of a pair of another tokenizer (proxy.cross): it never reads the base's ids

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None))

    @property
    def empty_prompt_ids(self) -> list[int]:
        """What an empty prompt is conditioned on: BOS, or EOS where there is none (lm-eval's hf model)."""
        tok = self.tokenizer
        token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if token is None:
            raise UserError("an empty prompt needs a BOS or EOS token to condition on; this tokenizer has neither")
        return [token]

    def encode(self, prompt: str) -> list[int]:
        text = render(prompt, self.fmt, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=self.fmt != CHAT)["input_ids"]
        return ids or self.empty_prompt_ids


class ProxyEngine:
    """Decode from `base` steered by zero or more (expert, anti-expert) pairs.

    The base and anti-experts read the raw prompt; each expert reads its own rendering of it
    (`SteeringPair.expert_format`). A model passed in more than one role with the same rendering runs
    once per step. `tokenizers` adds tokenizers to the vocabulary check (role -> tokenizer).

    A pair whose tokenizer is not the base's steers through text (proxy.cross): at each step its offset is
    scored over `candidates` of the base's tokens by what they spell.
    """

    def __init__(self, base, tokenizer, pairs: Sequence[SteeringPair] = (), tokenizers: dict | None = None,
                 parallel: bool = False, base_format: str | None = None, plausibility: float = 0.0,
                 candidates: int = 16):
        self.base = base
        self.plausibility = check_plausibility(plausibility)  # proxy.plausibility (proxy.combine.plausible_tokens)
        self.tokenizer = tokenizer
        self.base_format = base_format  # how the base reads prompts: raw, unless it is a chat model decoding alone
        self.pairs = list(pairs)
        for pair in self.pairs:
            pair.alpha = check_alpha(pair.alpha)
            if pair.shared and pair.expert_format not in (None, "{prompt}"):
                raise UserError("a shared LoRA pair reads one rendering of the prompt: drop proxy.expert_format")
        roles = {"base": tokenizer, **(tokenizers or {})}
        widths = {"base": logit_width(base)}
        self.candidates = check_candidates(candidates)
        for pair in self.pairs:
            pair.cross = is_cross(pair, tokenizer) if pair.cross is None else bool(pair.cross)
            if pair.cross:
                continue
            roles[f"expert '{pair.name}'"] = pair.tokenizer or tokenizer
            roles[f"anti-expert of '{pair.name}'"] = pair.anti_tokenizer or tokenizer
            widths[f"expert '{pair.name}'"] = logit_width(pair.expert)
            widths[f"anti-expert of '{pair.name}'"] = logit_width(pair.anti_expert)
        self.vocab_size = shared_vocab_size(roles, widths)
        self.device = model_device(base)
        self.streams, self.base_key, self.pair_keys = self._stream_plan()
        self.stop_ids = stop_set([self._base_ends(s) for s in self.streams.values()], self.vocab_size)
        if not self.stop_ids:
            raise UserError("no model of the run names an end-of-sequence token; set one in its generation config")
        base_ends = [i for i in self.streams[self.base_key].ends if i < self.vocab_size]
        self.end_id = base_ends[0] if base_ends else self.stop_ids[0]  # where ends beyond the shared range fold
        self.pad_id = self.streams[self.base_key].pad_id
        if parallel and any(p.cross for p in self.pairs):
            raise UserError("proxy.parallel does not run an expert of another tokenizer (proxy.cross); drop one")
        self.bridges = {i: self._bridge(i) for i, p in enumerate(self.pairs) if p.cross}
        self.last_stats = DecodeStats()
        self.parallel = parallel and bool(self.pairs)  # the small models in a second process (proxy.parallel)
        self._worker = None

    # -- streams ----------------------------------------------------------------------------------
    def _stream_plan(self):
        """Distinct (model, prompt format) streams, and for each pair the keys of its two streams."""
        streams: dict[tuple, Stream] = {}

        def key_for(model, tokenizer, fmt, cross=False):
            fmt = None if fmt in (None, RAW) else fmt
            key = (id(model), fmt)
            if key not in streams:
                streams[key] = Stream(model, tokenizer, fmt, end_ids(model, tokenizer), cross)
            return key

        base_key = key_for(self.base, self.tokenizer, self.base_format)
        pair_keys = []
        for p in self.pairs:
            expert_key = key_for(p.expert, p.tokenizer or self.tokenizer, p.expert_format, p.cross)
            anti_key = expert_key if p.shared else key_for(p.anti_expert, p.anti_tokenizer or self.tokenizer, None,
                                                           p.cross)
            pair_keys.append((expert_key, anti_key))
        return streams, base_key, pair_keys

    def _base_ends(self, stream: Stream) -> list[int]:
        """The base's ids a stream ends on: its own, or (a model of another tokenizer) those of its end tokens
        that the base has too (the same token)."""
        if not stream.cross:
            return stream.ends
        table = self.tokenizer.get_vocab()
        return [table[t] for t in stream.tokenizer.convert_ids_to_tokens(stream.ends) if t in table]

    def _bridge(self, i: int):
        """Pair i's vocabulary bridge to the base's (proxy.bridge), for a pair of another tokenizer."""
        from proxy.bridge import Bridge, Vocabulary

        pair, (e, a) = self.pairs[i], self.pair_keys[i]
        if pair.shared:
            raise UserError(f"the tokenizer of expert '{pair.name}' does not match the base's, and proxy.shared_pair "
                            "runs a LoRA expert of the base's own tokenizer: set proxy.shared_pair=false")
        small = pair.tokenizer or self.tokenizer
        shared_vocab_size({f"expert '{pair.name}'": small, f"anti-expert of '{pair.name}'": pair.anti_tokenizer or small},
                          advice="an expert and its anti-expert (the model it was tuned from) must share one "
                                 "tokenizer, even where it is not the base's")
        for key in (e, a):  # the candidates' branches are cropped from each small model's cache again
            AttentionLayout(self.streams[key].model).check_rollback("an expert of another tokenizer family (proxy.cross)")
        ends = self.streams[e].ends + self.streams[a].ends
        if getattr(self, "_base_vocabulary", None) is None:  # one for every pair of another tokenizer
            self._base_vocabulary = Vocabulary(self.tokenizer, self.streams[self.base_key].ends)
        return Bridge(self._base_vocabulary, Vocabulary(small, ends), self.stop_ids, self.end_id)

    def open_runners(self) -> dict:
        """A fresh runner for every stream that reads the base's ids, and one per pair of another tokenizer."""
        from proxy.cross import CrossPair

        runners = {key: open_stream(s.model) for key, s in self.streams.items() if not s.cross}
        for i, bridge in self.bridges.items():
            runners[("cross", i)] = CrossPair(bridge, self.pairs[i].expert, self.pairs[i].anti_expert, self.candidates)
        return runners

    def prefill_runners(self, runners: dict, padded: dict) -> dict:
        """Start the runners on the prompts (every stream's (ids, mask)): the first logits by key (a pair of
        another tokenizer: its proxy.cross.CrossPair)."""
        logits = {}
        for key, runner in runners.items():
            if key[0] == "cross":
                e, a = self.pair_keys[key[1]]
                logits[key] = runner.prefill(padded[e], padded[a])
            else:
                logits[key] = runner.prefill(*padded[key])
        return logits

    def encode(self, prompt: str, fmt: str | None = None, key: tuple | None = None) -> list[int]:
        """The ids a stream reads for a prompt (by default the base's stream, or the first with format `fmt`)."""
        if key is None:
            fmt = None if fmt in (None, RAW) else fmt
            key = next((k for k, s in self.streams.items() if k[1] == fmt and not s.cross), self.base_key)
        return self.streams[key].encode(prompt)

    def _small_model_worker(self):
        """The forked process that runs every stream but the base's, started at the first batch."""
        if self._worker is None:
            from proxy.parallel import ParallelStreams

            models = {k: s.model for k, s in self.streams.items() if k != self.base_key}
            self._worker = ParallelStreams(models)
        return self._worker

    def close(self) -> None:
        """Stop the small-model worker, if one was started (also when __init__ failed half-way)."""
        if getattr(self, "_worker", None) is not None:
            self._worker.close()
            self._worker = None

    def __del__(self):
        self.close()

    def context_limit(self, model) -> int | None:
        return getattr(model.config, "max_position_embeddings", None)

    def encode_prompt(self, prompt: Prompt, extra: int, ids: Sequence[int] | None = None) -> dict[tuple, list[int]]:
        """What every stream reads for one prompt (text, or chat messages); UserError where it is too long
        for a model with `extra` new tokens. `ids`: the prompt as the caller already tokenized it (lm-eval,
        token-id requests): every stream that reads the raw prompt takes them, and a stream with its own
        rendering still reads the text."""
        encoded = {}
        for key, stream in self.streams.items():
            raw_ids = ids is not None and stream.fmt is None and not stream.cross
            row = (list(ids) or stream.empty_prompt_ids) if raw_ids else stream.encode(prompt)
            limit = self.context_limit(stream.model)
            if limit is not None and len(row) + extra > limit:
                shown = prompt if isinstance(prompt, str) else plain_text(prompt)
                raise UserError(
                    f"the prompt ({shown[:40]!r}...) is {len(row)} tokens; with {extra} new tokens it exceeds the "
                    f"model's context of {limit}; shorten it or ask for fewer new tokens (generation.max_new_tokens)"
                )
            encoded[key] = row
        return encoded

    def encode_batch(self, prompts: Sequence[Prompt], extra: int, prompt_ids: Sequence[list[int]] | None = None
                      ) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """Every stream's left-padded (ids, mask) for the prompts (see `encode_prompt`)."""
        encoded = [self.encode_prompt(p, extra, None if prompt_ids is None else prompt_ids[i])
                   for i, p in enumerate(prompts)]
        return {key: left_pad([e[key] for e in encoded], stream.pad_id) for key, stream in self.streams.items()}

    def view(self, key, logits: torch.Tensor) -> torch.Tensor:
        """A stream's logits over the shared vocabulary, its ends beyond it folded into the shared end id."""
        stream = self.streams[key]
        fold = [i for i in stream.ends if self.vocab_size <= i < logits.shape[-1]]
        return shared_logits(logits, self.vocab_size, fold, self.end_id)

    def combine(self, logits: dict, alphas: Sequence | None = None, constrained: bool = True) -> torch.Tensor:
        """The proxy scores over the shared vocabulary from every stream's logits (key -> (..., V)); with
        `constrained`, under proxy.plausibility (decoding), else the paper's law (scoring a given text)."""
        offsets = []
        base = self.view(self.base_key, logits[self.base_key])
        for i, (p, (e, a)) in enumerate(zip(self.pairs, self.pair_keys)):
            alpha = p.alpha if alphas is None else alphas[i]
            if p.cross:  # its proxy.cross.CrossPair scores the base's candidates through text
                offsets.append((alpha, logits[("cross", i)].offset(base), None))
            elif p.shared:  # one stream whose logits are [expert | anti-expert]
                width = logits[e].shape[-1] // 2
                offsets.append((alpha, self.view(e, logits[e][..., :width]), self.view(e, logits[e][..., width:])))
            else:
                offsets.append((alpha, self.view(e, logits[e]), self.view(a, logits[a])))
        # the scores meet on the device of the base's inputs (a base split over GPUs ends on another one)
        return proxy_logits(base.to(self.device), offsets,
                            self.plausibility if constrained else 0.0)

    def rules(self, settings: GenerationSettings) -> DecodeRules:
        return DecodeRules(self.base, settings, self.stop_ids, self.pad_id, self.tokenizer, self.device)

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], settings: GenerationSettings | None = None, diagnostics: bool = False,
        prompt_ids: Sequence[list[int]] | None = None, checkpoint: Checkpoint | None = None,
    ) -> list[Generation]:
        """Decode every prompt (in batches of settings.batch_size). `prompt_ids`: the prompts already
        tokenized by the base's tokenizer, for the streams that read them raw. `checkpoint`: each batch's
        generations are added to it as they finish, and those it holds from an interrupted run of the same
        job are taken instead of decoded again."""
        rules = self.rules(settings or GenerationSettings())
        stats = DecodeStats()
        start = time.perf_counter()
        out: list[Generation] = []
        if checkpoint is not None:
            out = [Generation(**r) for r in checkpoint.load()[: len(prompts)]]
            out = out if all(g.prompt == p for g, p in zip(out, prompts)) else []
            checkpoint.start([dataclasses.asdict(g) for g in out])
            if out:
                print(f"resuming: {len(out)} of {len(prompts)} prompts were decoded before", file=sys.stderr)
        batch_size = max(1, int(rules.settings.batch_size))
        for i in range(len(out), len(prompts), batch_size):
            ids = None if prompt_ids is None else prompt_ids[i : i + batch_size]
            try:
                done = self._generate_batch(list(prompts[i : i + batch_size]), rules, diagnostics, stats, ids)
            except UserError as err:
                if checkpoint is None or not out:
                    raise
                raise UserError(f"{err}; {len(out)} of {len(prompts)} prompts are saved in {checkpoint.path}: the "
                                f"same command in that folder (hydra.run.dir={checkpoint.path.parent}) goes on "
                                "from them") from None
            if checkpoint is not None:
                checkpoint.add(dataclasses.asdict(g) for g in done)
            out += done
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return out

    def _prefill(self, padded: dict) -> tuple[dict, dict, object]:
        """Start every stream on its prompts: (first logits by key, local runners, the worker or None)."""
        worker = self._small_model_worker() if self.parallel else None
        if worker:
            runners = {self.base_key: open_stream(self.base)}
            logits = worker.prefill({k: v for k, v in padded.items() if k != self.base_key})
            return {**logits, **self.prefill_runners(runners, padded)}, runners, worker
        runners = self.open_runners()
        return self.prefill_runners(runners, padded), runners, worker

    def _generate_batch(self, prompts, rules: DecodeRules, diagnostics, stats, prompt_ids=None) -> list[Generation]:
        padded = self.encode_batch(prompts, rules.max_new_tokens + self.draft_margin(len(prompts)), prompt_ids)
        rows = self.decode_batch(padded, rules, stats, diagnostics)
        if diagnostics:
            records = [e for row in rows.rows for e in row.records]
            stats.diagnosed_tokens += len(records)
            stats.changed_tokens += sum(e["changed"] for e in records)
        return rows.generations(prompts, self.tokenizer)

    def draft_margin(self, batch: int) -> int:
        """How many positions past its budget a row may need (a speculative batch's extra drafts)."""
        return 0

    def decode_batch(self, padded: dict, rules: DecodeRules, stats: DecodeStats, diagnostics: bool = False) -> Rows:
        """Decode one batch, one token a round (proxy.step): the rows, ended."""
        logits, runners, worker = self._prefill(padded)
        rows = Rows.batch(rules, *padded[self.base_key], self.pad_id, diagnostics)
        stats.row_forwards += len(rows)
        while True:
            stats.new_tokens += next_tokens(self, rows, logits)  # combine, process, pick, record, advance
            stats.steps += 1
            if rows.done:
                break
            stats.row_forwards += int(rows.active.sum())
            if worker:
                worker.submit(rows.last)  # the small models step while the base does
            logits = {key: runner.step(rows.last, rows.active) for key, runner in runners.items()}
            if worker:
                logits.update(worker.collect())
        stats.count_forwards(runners, self.base_key)
        return rows

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8) -> list[dict]:
        """Log-likelihood of each continuation after its prompt under the proxy distribution.

        Returns, per pair, {"logprob": sum over the continuation's tokens, "num_tokens", "is_greedy"}.
        The continuation's tokens are those that `prompt + continuation` adds to `prompt`'s encoding; an
        empty prompt is conditioned on BOS (EOS where there is none).
        """
        if len(prompts) != len(continuations):
            raise UserError("score() needs as many continuations as prompts")
        requests = [(p, self.encode(p), self.continuation_ids(p, c)) for p, c in zip(prompts, continuations)]
        return self.score_tokens(requests, batch_size)

    def continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        whole = self.tokenizer(prompt + continuation)["input_ids"]
        head = self.tokenizer(prompt)["input_ids"]
        if whole[: len(head)] != head:  # the join merged tokens across the boundary
            return self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return whole[len(head):]

    @torch.inference_mode()
    def score_tokens(self, requests: Sequence[tuple[str | None, list[int], list[int]]], batch_size: int = 8,
                     alpha: float | None = None, top_k: int = 0) -> list[dict]:
        """Like `score`, for requests (context text or None, context ids, continuation ids) with ids in the
        base's vocabulary: every stream that reads the prompt raw takes the context ids; a stream with its
        own rendering reads the context text through it (the ids, where there is no text). `alpha`: the
        first pair's strength for these requests (default: its own); `top_k`: also each position's k
        likeliest tokens (proxy.scoring.score_batch)."""
        alphas = None
        if alpha is not None and self.pairs:
            alphas = [check_alpha(alpha)] + [p.alpha for p in self.pairs[1:]]
        results = []
        for i in range(0, len(requests), batch_size):
            results += score_batch(self, requests[i : i + batch_size], alphas, top_k)
        return results
