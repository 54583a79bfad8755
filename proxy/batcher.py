"""Continuous batching: requests from many clients decoded together. A request joins the running batch
between two steps (its prompt prefilled, its caches aligned with the others'), takes one token per step
with its own settings (alpha, sampling, stop strings, budget), and leaves when it ends or its client goes
away. Every row sees exactly what it would see alone, so batching never changes a greedy answer.

    batcher = Batcher(engine, max_batch=32, max_queue=64)   # a thread that owns the engine's models
    batcher.submit(Request(prompt="...", settings=GenerationSettings(...), listener=on_event))
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from core.errors import UserError
from proxy.decoding import GenerationSettings
from proxy.engine import ProxyEngine
from proxy.prompts import Prompt
from proxy.step import Row, Rows, next_tokens
from proxy.streams import left_pad
from proxy.text import generated_text


class Busy(Exception):
    """The queue of requests waiting for a place in the batch is full."""


@dataclass
class Request:
    """One prompt to decode (one choice of an API request), and who to tell about each token."""

    prompt: Prompt
    settings: GenerationSettings
    listener: Callable[[dict], None]  # called in the batcher's thread with each event
    prompt_ids: list[int] | None = None  # the prompt already tokenized (token-id requests)
    alpha: float | None = None  # the first pair's alpha for this request; None keeps the engine's
    logprobs: int | None = None  # log-probabilities of this many top tokens at each step
    diagnostics: bool = False  # per token: the base's choice, whether the proxy changed it, KL(proxy || base)
    cancelled: bool = False
    encoded: dict = field(default_factory=dict)  # what each stream reads, set when validated
    rules: object = None  # its decoding rules (proxy.decoding.DecodeRules), set when validated


class LiveRow:
    """A request in the batch: its row (proxy.step.Row) and the text it has sent so far."""

    def __init__(self, request: Request, engine: ProxyEngine):
        self.request, self.engine = request, engine
        self.ids = request.encoded[engine.base_key]
        rules = request.rules or engine.rules(request.settings)
        self.row = Row(rules, self.ids, alpha=request.alpha, diagnostics=request.diagnostics, logprobs=request.logprobs)
        self.sent = ""

    def token_event(self) -> dict:
        """The event of the row's last token: the new text, and what the client asked for."""
        token = self.row.generated[-1]
        event = {"type": "token", "token_id": token, "text": self.new_text()}
        if self.row.recording:
            record = self.row.records[-1]
            if self.request.logprobs is not None:  # under the proxy distribution, before sampling's filters
                event.update({k: record[k] for k in ("logprob", "token", "top_logprobs")})
            if self.request.diagnostics:
                event["diagnostics"] = {"changed": record["changed"], "kl": record["kl_proxy_base"],
                                        "base_top": generated_text(self.engine.tokenizer, [record["base_top_id"]])}
        return event

    def new_text(self) -> str:
        """The text the client has not seen yet. While the row goes on, a trailing half character and a
        tail that could begin a stop string are held back, so the pieces add up to the final text."""
        row = self.row
        if row.reason is not None:
            text = row.text(self.engine.tokenizer)
        else:
            text = generated_text(self.engine.tokenizer, row.generated).rstrip("\ufffd")
            held = max((n for s in row.rules.stop_strings.stop for n in range(1, len(s)) if text.endswith(s[:n])),
                       default=0)
            text = text[: len(text) - held]
        if not text.startswith(self.sent):
            return ""  # decoding rewrote earlier text (rare): the final event carries the rest
        piece, self.sent = text[len(self.sent):], text
        return piece

    def end_event(self) -> dict:
        row = self.row
        return {"type": "end", "finish_reason": row.reason, "text": row.text(self.engine.tokenizer),
                "prompt_tokens": len(self.ids), "completion_tokens": len(row.generated) - (row.reason == "eos")}


class LiveBatch:
    """The running batch: one stream per model with the rows' caches, the rows, and their next logits."""

    def __init__(self, engine: ProxyEngine):
        self.engine = engine
        self.runners = engine.open_runners()
        self.members: list[LiveRow] = []
        self.rows = Rows([], engine.device, engine.pad_id)  # the live rows' proxy.step rows, in batch order
        self.logits: dict = {}
        self.peak_rows = 0  # the most rows decoded together so far

    def admit(self, requests: list[Request]) -> list[tuple[Callable, dict]]:
        """Prefill the requests together and join them below the running rows; the error events of those
        that could not join (each fails alone)."""
        joining, failed = [], []
        for request in requests:
            try:
                joining.append(LiveRow(request, self.engine))
            except Exception as err:
                failed.append((request.listener, {"type": "error", "message": describe(err)}))
        if not joining:
            return failed
        padded = {key: left_pad([lr.request.encoded[key] for lr in joining], stream.pad_id)
                  for key, stream in self.engine.streams.items()}
        fresh = self.engine.open_runners()
        for key, logits in self.engine.prefill_runners(fresh, padded).items():
            self.runners[key].join(fresh[key])
            if not isinstance(logits, torch.Tensor):  # a pair of another tokenizer (proxy.cross) holds its own
                self.logits[key] = self.runners[key]
                continue
            self.logits[key] = logits if key not in self.logits else torch.cat([self.logits[key], logits])
        self.members += joining
        self.rows.join([lr.row for lr in joining])
        self.peak_rows = max(self.peak_rows, len(self.members))
        return failed

    @torch.inference_mode()
    def step(self) -> list[tuple[Callable, dict]]:
        """One token for every row (proxy.step); rows that ended or were cancelled leave the batch. Returns
        the step's events, each with the listener it is for."""
        self.leave([r for r, lr in enumerate(self.members) if not lr.request.cancelled])
        if not self.members:
            return []
        next_tokens(self.engine, self.rows, self.logits)  # each row by its own settings and alpha
        events = [(lr.request.listener, lr.token_event()) for lr in self.members]
        events += [(lr.request.listener, lr.end_event()) for lr in self.members if lr.row.reason is not None]
        self.leave([r for r, lr in enumerate(self.members) if lr.row.reason is None])
        if self.members:
            self.logits = {key: runner.step(self.rows.last) for key, runner in self.runners.items()}
        return events

    def leave(self, keep: list[int]) -> None:
        if len(keep) == len(self.members):
            return
        self.members = [self.members[r] for r in keep]
        self.rows.select(keep)
        if not self.members:  # start afresh: the caches' layout may differ for the next requests
            self.runners = self.engine.open_runners()
            self.logits = {}
            return
        for key, runner in self.runners.items():
            runner.select(keep)
            self.logits[key] = self.logits[key][keep] if isinstance(self.logits[key], torch.Tensor) else runner

    def fail(self, message: str) -> list[tuple[Callable, dict]]:
        """Start afresh after a failure; the events that tell every row."""
        events = [(lr.request.listener, {"type": "error", "message": message}) for lr in self.members]
        self.leave([])
        return events


class Batcher:
    """A thread that owns one engine's models and decodes every submitted request in one running batch."""

    def __init__(self, engine: ProxyEngine, max_batch: int = 32, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise UserError("server.max_batch and server.max_queue must be at least 1")
        self.engine, self.max_batch, self.max_queue = engine, int(max_batch), int(max_queue)
        self.live = LiveBatch(engine)
        self.pending: collections.deque[Request] = collections.deque()
        self.chores: collections.deque[tuple[Callable, Future]] = collections.deque()  # run between steps
        self.wake = threading.Condition()
        self.running = True
        # hands a step's events to their listeners; a server replaces it to cross into its event loop once a step
        self.deliver: Callable[[list[tuple[Callable, dict]]], None] = lambda events: [fn(e) for fn, e in events]
        self.thread = threading.Thread(target=self._loop, name="proxy-batcher", daemon=True)
        self.thread.start()

    def validate(self, request: Request) -> Request:
        """Encode the prompt for every model and check the settings; UserError for a bad request."""
        extra = int(request.settings.max_new_tokens or 0)
        request.encoded = self.engine.encode_prompt(request.prompt, extra, request.prompt_ids)
        request.rules = self.engine.rules(request.settings)  # refuses bad settings here, in the client's thread
        return request

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (already validated) for the batch; Busy when the queue cannot take them all."""
        with self.wake:
            if len(self.pending) + len(requests) > self.max_queue:
                raise Busy(f"the server is busy: {len(self.pending)} requests are waiting for a place; retry later")
            self.pending.extend(requests)
            self.wake.notify()

    def run(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the batcher's thread between two steps (it owns the models); its result's future."""
        future: Future = Future()
        with self.wake:
            self.chores.append((fn, future))
            self.wake.notify()
        return future

    def cancel(self, requests: list[Request]) -> None:
        """A client went away: its rows leave the batch at the next step (or never join it)."""
        for request in requests:
            request.cancelled = True

    def close(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify()
        self.thread.join(timeout=30)

    def _next(self) -> list[Request] | None:
        """Wait for work; the requests that can join the batch now (None: stop)."""
        with self.wake:
            while self.running and not self.pending and not self.live.rows and not self.chores:
                self.wake.wait()
            if not self.running:
                return None
            chores, self.chores = list(self.chores), collections.deque()
            room = self.max_batch - len(self.live.rows)
            joining = []
            while self.pending and len(joining) < room:
                request = self.pending.popleft()
                if not request.cancelled:
                    joining.append(request)
        for fn, future in chores:
            try:
                future.set_result(fn())
            except Exception as err:
                future.set_exception(err)
        return joining

    def _loop(self) -> None:
        while (joining := self._next()) is not None:
            try:  # a failure reaches the clients it concerns, and the server keeps serving
                self.deliver(self.live.admit(joining))
            except Exception as err:
                self.deliver([(request.listener, {"type": "error", "message": describe(err)}) for request in joining])
            try:
                if self.live.rows:
                    self.deliver(self.live.step())
            except Exception as err:
                self.deliver(self.live.fail(describe(err)))


def describe(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"
