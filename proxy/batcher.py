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
from proxy.combine import token_diagnostics
from proxy.decoding import GenerationSettings
from proxy.engine import ProxyEngine
from proxy.prompts import Prompt
from proxy.streams import ModelStream, left_pad
from proxy.text import final_text, generated_text


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
    """A request in the batch: its ids, its rules, the text it has sent so far."""

    def __init__(self, request: Request, engine: ProxyEngine):
        self.request, self.engine = request, engine
        self.rules = request.rules or engine.rules(request.settings)
        self.ids = request.encoded[engine.base_key]
        self.processors = self.rules.processors(torch.ones(1, len(self.ids), dtype=torch.long))
        alphas = [p.alpha for p in engine.pairs]
        if alphas and request.alpha is not None:
            alphas[0] = request.alpha
        self.alphas = alphas
        self.generated: list[int] = []
        self.reason: str | None = None
        self.sent = ""

    def choose(self, scores: torch.Tensor, top: int) -> tuple[int, torch.Tensor]:
        """This row's token from its proxy scores (V,), with its own processors and sampling (`top`: the
        scores' argmax, a greedy row's token when nothing processes them); and the scores it was picked from."""
        if not self.processors and not self.rules.do_sample:
            return top, scores
        processed = scores[None]
        if self.processors:
            ids = torch.tensor([self.ids + self.generated], device=scores.device)
            processed = self.processors(ids, processed)
        return int(self.rules.pick(processed)[0]), processed[0]

    def take(self, token: int, processed: torch.Tensor, base: torch.Tensor | None, proxy: torch.Tensor) -> dict:
        """Append the token; the event that tells the client (the new text, and what it asked for)."""
        self.generated.append(token)
        self.reason = self.rules.finish_reason(self.generated)
        event = {"type": "token", "token_id": token, "text": self.new_text()}
        if self.request.logprobs is not None:  # under the proxy distribution, before sampling's filters
            logprobs = torch.log_softmax(proxy.float(), -1)
            top = logprobs.topk(max(1, self.request.logprobs))
            event["logprob"] = float(logprobs[token])
            event["token"] = generated_text(self.engine.tokenizer, [token])
            event["top_logprobs"] = [(generated_text(self.engine.tokenizer, [int(i)]), float(v))
                                     for v, i in zip(top.values, top.indices)]
        if self.request.diagnostics and base is not None:
            diag = token_diagnostics(base[None].float(), proxy[None])
            event["diagnostics"] = {"changed": bool(diag["changed"][0]), "kl": round(float(diag["kl_proxy_base"][0]), 5),
                                    "base_top": generated_text(self.engine.tokenizer, [int(diag["base_top"][0])])}
        return event

    def new_text(self) -> str:
        """The text the client has not seen yet. While the row goes on, a trailing half character and a
        tail that could begin a stop string are held back, so the pieces add up to the final text."""
        stop = self.rules.stop_strings.stop
        if self.reason is not None:
            text = final_text(self.engine.tokenizer, self.generated, self.reason, stop)
        else:
            text = generated_text(self.engine.tokenizer, self.generated).rstrip("\ufffd")
            held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        if not text.startswith(self.sent):
            return ""  # decoding rewrote earlier text (rare): the final event carries the rest
        piece, self.sent = text[len(self.sent):], text
        return piece

    def end_event(self) -> dict:
        text = final_text(self.engine.tokenizer, self.generated, self.reason, self.rules.stop_strings.stop)
        return {"type": "end", "finish_reason": self.reason, "text": text, "prompt_tokens": len(self.ids),
                "completion_tokens": len(self.generated) - (self.reason == "eos")}


class LiveBatch:
    """The running batch: one stream per model with the rows' caches, and the rows' next logits."""

    def __init__(self, engine: ProxyEngine):
        self.engine = engine
        self.runners = {key: ModelStream(s.model) for key, s in engine.streams.items()}
        self.rows: list[LiveRow] = []
        self.logits: dict = {}
        self.peak_rows = 0  # the most rows decoded together so far

    def admit(self, requests: list[Request]) -> list[tuple[Callable, dict]]:
        """Prefill the requests together and join them below the running rows; the error events of those
        that could not join (each fails alone)."""
        rows, failed = [], []
        for request in requests:
            try:
                rows.append(LiveRow(request, self.engine))
            except Exception as err:
                failed.append((request.listener, {"type": "error", "message": describe(err)}))
        requests = [row.request for row in rows]
        if not requests:
            return failed
        for key, stream in self.engine.streams.items():
            fresh = ModelStream(stream.model)
            logits = fresh.prefill(*left_pad([r.encoded[key] for r in requests], stream.pad_id))
            self.runners[key].join(fresh)
            self.logits[key] = logits if key not in self.logits else torch.cat([self.logits[key], logits])
        self.rows += rows
        self.peak_rows = max(self.peak_rows, len(self.rows))
        return failed

    @torch.inference_mode()
    def step(self) -> list[tuple[Callable, dict]]:
        """One token for every row; rows that ended or were cancelled leave the batch. Returns the step's
        events, each with the listener it is for."""
        engine, events = self.engine, []
        alphas = [torch.tensor([[row.alphas[i]] for row in self.rows], device=engine.device)
                  for i in range(len(engine.pairs))]
        scores = engine.combine(self.logits, alphas)  # s_base + alpha_row * (s_expert - s_anti), (B, V)
        base = None
        if any(row.request.diagnostics for row in self.rows):
            base = engine.view(engine.base_key, self.logits[engine.base_key]).to(engine.device)
        tops = scores.argmax(-1).tolist()
        tokens = []
        for r, row in enumerate(self.rows):
            if row.request.cancelled:
                tokens.append(engine.pad_id)
                continue
            token, processed = row.choose(scores[r], tops[r])
            events.append((row.request.listener, row.take(token, processed, None if base is None else base[r], scores[r])))
            tokens.append(token)
        keep = [r for r, row in enumerate(self.rows) if row.reason is None and not row.request.cancelled]
        events += [(row.request.listener, row.end_event()) for row in self.rows
                   if row.reason is not None and not row.request.cancelled]
        self.leave(keep)
        if self.rows:
            step_tokens = torch.tensor([tokens[r] for r in keep], device=engine.device)
            self.logits = {key: runner.step(step_tokens) for key, runner in self.runners.items()}
        return events

    def leave(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[r] for r in keep]
        if not self.rows:  # start afresh: the caches' layout may differ for the next requests
            self.runners = {key: ModelStream(s.model) for key, s in self.engine.streams.items()}
            self.logits = {}
            return
        for key, runner in self.runners.items():
            runner.select(keep)
            self.logits[key] = self.logits[key][keep]

    def fail(self, message: str) -> list[tuple[Callable, dict]]:
        """Start afresh after a failure; the events that tell every row."""
        events = [(row.request.listener, {"type": "error", "message": message}) for row in self.rows]
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
