"""The proxy-tuned model over HTTP, in OpenAI's protocol (what vLLM, TGI, llama.cpp and Ollama serve), and a
page at `/` that shows, token by token, what the expert pair changed.

- GET  /v1/models
- POST /v1/completions        prompt: a string, a list of them, token ids or lists of token ids
- POST /v1/chat/completions   messages, rendered with the expert's chat template for the expert
Both take max_tokens, temperature (0 = greedy), top_p, stop, seed, stream (server-sent events ending in
`data: [DONE]`), and `alpha` to steer with another strength; completions also logprobs and echo. Extensions:
`diagnostics: true` adds, per token, the base's own choice, whether the proxy changed it and KL(proxy || base).
Bad requests get OpenAI's error JSON with status 400; a full queue, 503.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from core.errors import UserError
from proxy.batcher import Batcher, Busy, Request
from proxy.decoding import GenerationSettings
from proxy.engine import check_alpha

PAGE = Path(__file__).with_name("page.html")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class Served:
    """A model the server answers for: the proxy-tuned base, the base alone (alpha 0), or the expert alone."""

    name: str
    role: str
    batcher: Batcher
    alpha: float | None = None  # fixed for this model (the base alone: 0); None: the request's or the engine's


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    n: int = 1
    alpha: Any = None
    diagnostics: bool = False


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    n: int = 1
    alpha: Any = None
    diagnostics: bool = False


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def dispatch(events) -> None:
    for listener, event in events:
        listener(event)


def error_response(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def settings_for(defaults: GenerationSettings, body, max_tokens: int | None) -> GenerationSettings:
    """The request's decoding settings: the server's, with what the request sets on top."""
    if body.n != 1:
        raise BadRequest("n above 1 is not supported; send the request n times", "n")
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if body.temperature is not None and body.temperature < 0:
        raise BadRequest(f"temperature must be 0 (greedy) or more, got {body.temperature}", "temperature")
    sample = bool(body.temperature)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or defaults.stop)
    return GenerationSettings(
        max_new_tokens=max_tokens or defaults.max_new_tokens, min_new_tokens=defaults.min_new_tokens,
        do_sample=sample, temperature=body.temperature if sample else None,
        top_p=body.top_p if sample else None, top_k=defaults.top_k if sample else None,
        repetition_penalty=defaults.repetition_penalty, seed=body.seed if body.seed is not None else defaults.seed,
        stop=stop, config=dict(defaults.config or {}))


def steering(served: Served, body) -> float | None:
    if served.alpha is not None:
        return served.alpha
    if body.alpha is None:
        return None
    if isinstance(body.alpha, bool):
        raise BadRequest(f"alpha must be a number, got {body.alpha!r}", "alpha")
    try:
        return check_alpha(body.alpha)
    except UserError as err:
        raise BadRequest(str(err).split(";")[0], "alpha") from None


class Exchange:
    """One HTTP request's rows in the batcher, and their events brought back to the event loop."""

    def __init__(self, served: Served, requests: list[Request]):
        self.served, self.requests = served, requests
        self.queue: asyncio.Queue = asyncio.Queue()
        for index, request in enumerate(requests):  # called in the event loop (see `create_app`'s lifespan)
            request.listener = lambda event, i=index: self.queue.put_nowait((i, event))

    async def events(self, http: HttpRequest):
        """(choice index, event) until every row has ended; the rows leave the batch if the client goes."""
        open_rows = len(self.requests)
        try:
            while open_rows:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if event["type"] in ("end", "error"):
                    open_rows -= 1
                yield index, event
        finally:
            self.served.batcher.cancel(self.requests)


class Endpoints:
    """The API's handlers over the served models."""

    def __init__(self, models: list[Served], defaults: GenerationSettings):
        self.models, self.defaults = models, defaults
        self.by_name = {m.name: m for m in models}

    def served(self, name: str) -> Served:
        if name not in self.by_name:
            raise BadRequest(f"unknown model '{name}'; this server has: {', '.join(self.by_name)}", "model")
        return self.by_name[name]

    def start(self, model: Served, prompts: list[tuple[Any, list[int] | None]], settings, body, logprobs=None
              ) -> Exchange:
        """The request's rows validated (400 for a bad one) and queued (503 when the queue is full)."""
        alpha = steering(model, body)
        requests = [Request(prompt=p, prompt_ids=ids, settings=settings, listener=print, alpha=alpha,
                            logprobs=logprobs, diagnostics=bool(body.diagnostics)) for p, ids in prompts]
        try:
            for request in requests:
                model.batcher.validate(request)
        except UserError as err:
            raise BadRequest(str(err), "prompt") from None
        exchange = Exchange(model, requests)
        try:
            model.batcher.submit(requests)
        except Busy as err:
            raise BadRequest(str(err), status=503, kind="server_busy") from None
        return exchange

    async def list_models(self):
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "proxy-tuning",
                                            "role": m.role} for m in self.models]}

    async def completions(self, body: CompletionBody, http: HttpRequest):
        model = self.served(body.model)
        settings = settings_for(self.defaults, body, body.max_tokens)
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise BadRequest(f"logprobs must be between 0 and 20, got {body.logprobs}", "logprobs")
        prompts = completion_prompts(body.prompt, model.batcher.engine.tokenizer)
        echoed = await echo_logprobs(model, prompts) if body.echo and body.logprobs is not None else None
        exchange = self.start(model, prompts, settings, body, body.logprobs)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        if body.stream:
            return sse(completion_chunks(exchange.events(http), head, body, prompts))
        choices, usage = await collect(exchange.events(http), len(prompts))
        out = []
        for i, choice in enumerate(choices):
            text = (prompt_text(prompts[i]) if body.echo else "") + choice["text"]
            item = {"index": i, "text": text, "finish_reason": choice["finish_reason"], "logprobs": None}
            if body.logprobs is not None:
                item["logprobs"] = completion_logprobs(choice["tokens"], echoed[i] if echoed else None)
            if body.diagnostics:
                item["diagnostics"] = choice["diagnostics"]
            out.append(item)
        return {**head, "choices": out, "usage": usage}

    async def chat(self, body: ChatBody, http: HttpRequest):
        model = self.served(body.model)
        settings = settings_for(self.defaults, body, body.max_completion_tokens or body.max_tokens)
        exchange = self.start(model, [(chat_messages(body.messages), None)], settings, body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model.name}
        if body.stream:
            return sse(chat_chunks(exchange.events(http), {**head, "object": "chat.completion.chunk"}, body))
        choices, usage = await collect(exchange.events(http), 1)
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish_reason"],
                **({"diagnostics": c["diagnostics"]} if body.diagnostics else {})} for i, c in enumerate(choices)]
        return {**head, "choices": out, "usage": usage}


def create_app(models: list[Served], defaults: GenerationSettings) -> FastAPI:
    """The FastAPI app: OpenAI's endpoints over the models' batchers, and the page."""
    api = Endpoints(models, defaults)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # each batcher hands a whole step's events to this event loop in one call
        loop = asyncio.get_running_loop()
        for batcher in {id(m.batcher): m.batcher for m in models}.values():
            batcher.deliver = lambda events: loop.call_soon_threadsafe(dispatch, events)
        yield

    app = FastAPI(title="proxy-tuning", description=__doc__, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error_response(f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", param=where or None)

    @app.exception_handler(BadRequest)
    async def bad(_request, exc: BadRequest):
        return error_response(str(exc), exc.status, exc.param, exc.kind)

    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"])
    app.add_api_route("/", lambda: HTMLResponse(PAGE.read_text()), methods=["GET"], response_class=HTMLResponse)
    return app


# ------------------------------------------------------------------------------------------ requests

def completion_prompts(prompt, tokenizer) -> list[tuple[str, list[int] | None]]:
    """(text, token ids or None) per prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise BadRequest("prompt is empty: give a string, a list of strings or a list of token ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, None))
        else:
            if any(not 0 <= t < len(tokenizer) for t in p):
                raise BadRequest(f"a token id lies outside the vocabulary of {len(tokenizer)} tokens", "prompt")
            out.append((tokenizer.decode(p), list(p)))
    return out


def chat_messages(messages: list[dict]) -> list[dict]:
    if not messages:
        raise BadRequest("messages is empty: give at least one {role, content} message", "messages")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a string role and a string content", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_text(prompt: tuple[str, list[int] | None]) -> str:
    return prompt[0]


async def echo_logprobs(model: Served, prompts) -> list[dict]:
    """Each prompt's own tokens with their log-probabilities under the model (the first has none)."""
    engine = model.batcher.engine

    def score():
        out = []
        for text, ids in prompts:
            ids = ids if ids is not None else engine.encode(text)
            tokens = engine.tokenizer.convert_ids_to_tokens(list(ids))
            offsets = [len(engine.tokenizer.decode(ids[:i])) for i in range(len(ids))]
            echoed = {"tokens": tokens, "offsets": offsets, "end": len(engine.tokenizer.decode(ids)),
                      "token_logprobs": [None] * len(ids), "top": [None] * len(ids)}
            if len(ids) > 1:
                s = engine.score_tokens([(text, ids[:1], ids[1:])])[0]
                top = [{engine.tokenizer.convert_ids_to_tokens(i): lp} for i, lp in zip(s["top_ids"], s["top_logprobs"])]
                echoed.update(token_logprobs=[None] + s["token_logprobs"], top=[None] + top)
            out.append(echoed)
        return out

    return await asyncio.wrap_future(model.batcher.run(score))


def completion_logprobs(tokens: list[dict], echoed: dict | None) -> dict:
    """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    if echoed is not None:
        out.update(tokens=list(echoed["tokens"]), token_logprobs=list(echoed["token_logprobs"]),
                   top_logprobs=list(echoed["top"]), text_offset=list(echoed["offsets"]))
        offset = echoed["end"]
    for t in tokens:
        out["tokens"].append(t.get("token", ""))
        out["token_logprobs"].append(t.get("logprob"))
        out["top_logprobs"].append(t.get("top_logprobs"))
        out["text_offset"].append(offset)
        offset += len(t["text"])
    return out


async def collect(events, n: int) -> tuple[list[dict], dict]:
    """Every choice's text, tokens, diagnostics and finish reason; the usage."""
    choices = [{"text": "", "tokens": [], "diagnostics": [], "finish_reason": None} for _ in range(n)]
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    async for index, event in events:
        choice = choices[index]
        if event["type"] == "error":
            raise BadRequest(f"decoding failed: {event['message']}", status=500, kind="server_error")
        if event["type"] == "token":
            choice["tokens"].append(event)
            if "diagnostics" in event:
                choice["diagnostics"].append({"text": event["text"], **event["diagnostics"]})
        else:
            choice["text"], choice["finish_reason"] = event["text"], FINISH[event["finish_reason"]]
            usage["prompt_tokens"] += event["prompt_tokens"]
            usage["completion_tokens"] += event["completion_tokens"]
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return choices, usage


# ------------------------------------------------------------------------------------------ streams

def sse(chunks) -> StreamingResponse:
    """Server-sent events in OpenAI's framing; a client that disconnects frees its rows (the events stop)."""

    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await chunks.aclose()

    return StreamingResponse(body(), media_type="text/event-stream")


async def completion_chunks(events, head: dict, body, prompts):
    if body.echo:
        for i, p in enumerate(prompts):
            yield {**head, "choices": [{"index": i, "text": prompt_text(p), "logprobs": None, "finish_reason": None}]}
    async for index, event in events:
        choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
        if event["type"] == "error":
            yield {**head, "error": {"message": event["message"], "type": "server_error"}}
            return
        if event["type"] == "token":
            choice["text"] = event["text"]
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs([event], None)
            if body.diagnostics and "diagnostics" in event:
                choice["diagnostics"] = event["diagnostics"]
        else:
            choice["finish_reason"] = FINISH[event["finish_reason"]]
        yield {**head, "choices": [choice]}


async def chat_chunks(events, head: dict, body):
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for index, event in events:
        if event["type"] == "error":
            yield {**head, "error": {"message": event["message"], "type": "server_error"}}
            return
        if event["type"] == "token":
            choice = {"index": index, "delta": {"content": event["text"]}, "finish_reason": None}
            if body.diagnostics and "diagnostics" in event:
                choice["diagnostics"] = event["diagnostics"]
        else:
            choice = {"index": index, "delta": {}, "finish_reason": FINISH[event["finish_reason"]]}
        yield {**head, "choices": [choice]}
