"""The proxy-tuned model over HTTP, in OpenAI's protocol (what vLLM, TGI, llama.cpp and Ollama serve), and a
page at `/` that shows, token by token, what the expert pair changed.

- GET  /v1/models
- POST /v1/completions        prompt: a string, a list of them, token ids or lists of token ids
- POST /v1/chat/completions   messages, rendered with the expert's chat template for the expert
Both take max_tokens, temperature (0 = greedy), top_p, stop, seed (without one each request samples anew),
stream (server-sent events ending in `data: [DONE]`, with stream_options.include_usage), logprobs (completions:
a count, with echo; chat: logprobs/top_logprobs) and `alpha` to steer with another strength. Log-probabilities
are the proxy distribution's, softmax(s_base + alpha (s_expert - s_anti)), before temperature and top_p.
Extension: `diagnostics: true` adds, per token, the base's own choice, whether the proxy changed it and
KL(proxy || base). Errors are OpenAI's error JSON: 400 for a bad request, 404/405 for a wrong route, 503 for a
full queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import UserError
from proxy.batcher import Batcher, Busy, Request
from proxy.decoding import GenerationSettings
from proxy.options import check_alpha
from proxy.text import generated_text

PAGE = Path(__file__).with_name("page.html")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class Served:
    """A model the server answers for: the proxy-tuned base, the base alone (alpha 0), or the expert alone."""

    name: str
    role: str
    batcher: Batcher
    alpha: float | None = None  # fixed for this model (the base alone: 0); None: the request's or the engine's


class RequestBody(BaseModel):
    """What completions and chat requests share: the model, sampling, stop strings, streaming, and the
    extensions (`alpha`, `diagnostics`). Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = 1.0
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    alpha: Any = None
    diagnostics: bool = False


class CompletionBody(RequestBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatBody(RequestBody):
    messages: list[dict]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


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
    # as OpenAI's: without a seed, each request samples anew
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    try:
        return GenerationSettings(
            max_new_tokens=max_tokens or defaults.max_new_tokens, min_new_tokens=defaults.min_new_tokens,
            do_sample=sample, temperature=body.temperature if sample else None,
            top_p=body.top_p if sample else None, top_k=defaults.top_k if sample else None,
            repetition_penalty=defaults.repetition_penalty, seed=seed,
            stop=stop, config=dict(defaults.config or {}))
    except UserError as err:  # the request's own names, not the command line's generation.<name>
        raise BadRequest(str(err).replace("generation.", "")) from None


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
        open_rows, checked = len(self.requests), time.monotonic()
        try:
            while open_rows:
                if time.monotonic() - checked > 0.5:  # tokens may keep coming: ask now and then all the same
                    if await http.is_disconnected():
                        return
                    checked = time.monotonic()
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
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

    async def start(self, model: Served, prompts: list[tuple[Any, list[int] | None]], settings, body,
                    logprobs=None) -> Exchange:
        """The request's rows validated (400 for a bad one) and queued (503 when the queue is full)."""
        alpha = steering(model, body)
        if len(prompts) > model.batcher.max_queue:
            raise BadRequest(f"{len(prompts)} prompts in one request are more than the server queues "
                             f"(server.max_queue={model.batcher.max_queue}); send them in smaller requests", "prompt")
        requests = [Request(prompt=p, prompt_ids=ids, settings=settings, listener=print, alpha=alpha,
                            logprobs=logprobs, diagnostics=bool(body.diagnostics)) for p, ids in prompts]
        try:
            model.batcher.engine.rules(settings)  # the settings, before any prompt
        except UserError as err:
            raise BadRequest(str(err)) from None
        try:  # tokenizing a long prompt takes time: off the event loop, so that other clients are served
            await asyncio.to_thread(lambda: [model.batcher.validate(r) for r in requests])
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
        echoed = None
        if body.echo and body.logprobs is not None:
            echoed = await echo_logprobs(model, prompts, steering(model, body))
        exchange = await self.start(model, prompts, settings, body, body.logprobs)
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
        top = chat_top_logprobs(body)
        exchange = await self.start(model, [(chat_messages(body.messages), None)], settings, body, top)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model.name}
        if body.stream:
            return sse(chat_chunks(exchange.events(http), {**head, "object": "chat.completion.chunk"}, body))
        choices, usage = await collect(exchange.events(http), 1)
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish_reason"],
                "logprobs": chat_logprobs(c["tokens"], body.top_logprobs or 0) if body.logprobs else None,
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
        if first.get("type") == "json_invalid":
            return error_response(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')});"
                                  " send a JSON object with Content-Type: application/json")
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error_response(f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # 404, 405: in OpenAI's error form too
        message = {404: f"no route {request.url.path}; this server has /v1/models, /v1/completions, "
                        "/v1/chat/completions, /health and /",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(message, exc.status_code, kind="not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

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
    """{role, content} messages; content a string or a list of text parts, as OpenAI's clients send."""
    if not messages:
        raise BadRequest("messages is empty: give at least one {role, content} message", "messages")
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest("message content parts must be text ({\"type\": \"text\", \"text\": ...}); "
                                 "this server reads text only", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise BadRequest("each message needs a string role and a string content", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def chat_top_logprobs(body: ChatBody) -> int | None:
    """How many alternatives each token's logprobs carry; None when the request wants no logprobs."""
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise BadRequest(f"top_logprobs must be between 0 and 20, got {body.top_logprobs}", "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def prompt_text(prompt: tuple[str, list[int] | None]) -> str:
    return prompt[0]


async def echo_logprobs(model: Served, prompts, alpha: float | None) -> list[dict]:
    """Each prompt's own tokens with their log-probabilities under the model at this strength (the first
    token has none)."""
    engine = model.batcher.engine

    def score():
        out = []
        for text, ids in prompts:
            ids = ids if ids is not None else engine.encode(text)
            tokens = [generated_text(engine.tokenizer, [i]) for i in ids]
            offsets = [len(engine.tokenizer.decode(ids[:i])) for i in range(len(ids))]
            echoed = {"tokens": tokens, "offsets": offsets, "end": len(engine.tokenizer.decode(ids)),
                      "token_logprobs": [None] * len(ids), "top": [None] * len(ids)}
            if len(ids) > 1:
                s = engine.score_tokens([(text, ids[:1], ids[1:])], alpha=alpha)[0]
                top = [{generated_text(engine.tokenizer, [i]): lp} for i, lp in zip(s["top_ids"], s["top_logprobs"])]
                echoed.update(token_logprobs=[None] + s["token_logprobs"], top=[None] + top)
            out.append(echoed)
        return out

    return await asyncio.wrap_future(model.batcher.run(score))


def completion_logprobs(tokens: list[dict], echoed: dict | None, offset: int = 0) -> dict:
    """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs, text_offset (from offset, the
    length of the text before these tokens)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echoed is not None:
        out.update(tokens=list(echoed["tokens"]), token_logprobs=list(echoed["token_logprobs"]),
                   top_logprobs=list(echoed["top"]), text_offset=list(echoed["offsets"]))
        offset = echoed["end"]
    for t in tokens:
        out["tokens"].append(t.get("token", ""))
        out["token_logprobs"].append(t.get("logprob"))
        out["top_logprobs"].append(by_text(t["top_logprobs"]) if "top_logprobs" in t else None)
        out["text_offset"].append(offset)
        offset += len(t["text"])
    return out


def by_text(alternatives: list[tuple[str, float]]) -> dict[str, float]:
    """The completion form's {text: logprob}: of tokens that print alike, the likeliest (they come best first)."""
    out: dict[str, float] = {}
    for text, logprob in alternatives:
        out.setdefault(text, logprob)
    return out


def chat_logprobs(tokens: list[dict], top: int) -> dict:
    """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and top alternatives."""

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t["token"], t["logprob"]),
                         "top_logprobs": [entry(text, lp) for text, lp in t["top_logprobs"][:top]]} for t in tokens]}


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


def wants_usage(body) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def usage_chunk(head: dict, usage: dict) -> dict:
    """stream_options.include_usage: a last chunk with no choices and the request's usage."""
    return {**head, "choices": [], "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}


async def completion_chunks(events, head: dict, body, prompts):
    offsets = [0] * len(prompts)  # each choice's text so far, for text_offset
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    if body.echo:
        for i, p in enumerate(prompts):
            offsets[i] = len(prompt_text(p))
            yield {**head, "choices": [{"index": i, "text": prompt_text(p), "logprobs": None, "finish_reason": None}]}
    async for index, event in events:
        choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
        if event["type"] == "error":
            yield {**head, "error": {"message": event["message"], "type": "server_error"}}
            return
        if event["type"] == "token":
            choice["text"] = event["text"]
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs([event], None, offsets[index])
            offsets[index] += len(event["text"])
            if body.diagnostics and "diagnostics" in event:
                choice["diagnostics"] = event["diagnostics"]
        else:
            choice["finish_reason"] = FINISH[event["finish_reason"]]
            usage["prompt_tokens"] += event["prompt_tokens"]
            usage["completion_tokens"] += event["completion_tokens"]
        yield {**head, "choices": [choice]}
    if wants_usage(body):
        yield usage_chunk(head, usage)


async def chat_chunks(events, head: dict, body):
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    async for index, event in events:
        if event["type"] == "error":
            yield {**head, "error": {"message": event["message"], "type": "server_error"}}
            return
        if event["type"] == "token":
            choice = {"index": index, "delta": {"content": event["text"]}, "finish_reason": None,
                      "logprobs": chat_logprobs([event], body.top_logprobs or 0) if body.logprobs else None}
            if body.diagnostics and "diagnostics" in event:
                choice["diagnostics"] = event["diagnostics"]
        else:
            choice = {"index": index, "delta": {}, "finish_reason": FINISH[event["finish_reason"]]}
            usage["prompt_tokens"] += event["prompt_tokens"]
            usage["completion_tokens"] += event["completion_tokens"]
        yield {**head, "choices": [choice]}
    if wants_usage(body):
        yield usage_chunk(head, usage)
