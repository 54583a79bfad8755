"""The proxy-tuned model over HTTP, in OpenAI's protocol (what vLLM, TGI, llama.cpp and Ollama serve), and a
page at `/` that shows, token by token, what the expert pair changed.

- GET  /v1/models             each model with its max_model_len (prompt + generation), as vLLM lists it
- POST /v1/completions        prompt: a string, a list of them, token ids or lists of token ids
- POST /v1/chat/completions   messages, rendered with the expert's chat template for the expert
Both take max_tokens, temperature (0 = greedy), top_p, stop, seed (without one each request samples anew),
stream (server-sent events ending in `data: [DONE]`, with stream_options.include_usage), logprobs (completions:
a count, with echo; chat: logprobs/top_logprobs; any count up to the vocabulary, -1 for all of it, as vLLM
serving with --max-logprobs -1) and `alpha` to steer with another strength. Log-probabilities are the proxy
distribution's, softmax(s_base + alpha (s_expert - s_anti)), before temperature and top_p. vLLM's dialect:
`return_tokens_as_token_ids: true` writes every token and alternative as "token_id:N" (texts can tie), and
`echo` with `max_tokens: 0` scores the prompt alone. Extension: `diagnostics: true` adds, per token, the base's
own choice, whether the proxy changed it and KL(proxy || base). Errors are OpenAI's error JSON: 400 for a bad
request, 404/405 for a wrong route, 503 for a full queue.
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

import torch
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
    return_tokens_as_token_ids: bool = False  # vLLM's: tokens written "token_id:N", never ambiguous


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
                                            "role": m.role, "max_model_len": max_model_len(m.batcher.engine)}
                                           for m in self.models]}

    async def completions(self, body: CompletionBody, http: HttpRequest):
        model = self.served(body.model)
        # vLLM's echo without generation: the prompt scored, and one token decoded (and counted) but not returned
        echo_only = body.echo and body.max_tokens == 0
        settings = settings_for(self.defaults, body, 1 if echo_only else body.max_tokens)
        top = logprob_count(body.logprobs, "logprobs", model.batcher.engine.vocab_size)
        prompts = completion_prompts(body.prompt, model.batcher.engine.tokenizer)
        exchange = await self.start(model, prompts, settings, body, top)
        echoed = None
        if body.echo and top is not None:
            try:
                echoed = await echo_logprobs(model, prompts, steering(model, body), top)
            except BaseException as err:
                model.batcher.cancel(exchange.requests)
                if isinstance(err, UserError):  # a base that cannot score a given text (proxy.remote's top-K)
                    raise BadRequest(str(err), "echo") from None
                raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        if body.stream:
            return sse(completion_chunks(exchange.events(http), head, body, prompts, echoed, echo_only))
        choices, usage = await collect(exchange.events(http), len(prompts))
        out = []
        for i, choice in enumerate(choices):
            tokens, generated = ([], "") if echo_only else (choice["tokens"], choice["text"])
            text = (prompt_text(prompts[i]) if body.echo else "") + generated
            item = {"index": i, "text": text, "finish_reason": choice["finish_reason"], "logprobs": None}
            if top is not None:
                item["logprobs"] = completion_logprobs(tokens, echoed[i] if echoed else None,
                                                       as_ids=body.return_tokens_as_token_ids)
            if body.diagnostics:
                item["diagnostics"] = choice["diagnostics"]
            out.append(item)
        return {**head, "choices": out, "usage": usage}

    async def chat(self, body: ChatBody, http: HttpRequest):
        model = self.served(body.model)
        settings = settings_for(self.defaults, body, body.max_completion_tokens or body.max_tokens)
        top = chat_top_logprobs(body, model.batcher.engine.vocab_size)
        exchange = await self.start(model, [(chat_messages(body.messages), None)], settings, body, top)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model.name}
        if body.stream:
            return sse(chat_chunks(exchange.events(http), {**head, "object": "chat.completion.chunk"}, body, top))
        choices, usage = await collect(exchange.events(http), 1)
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish_reason"],
                "logprobs": chat_logprobs(c["tokens"], top, body.return_tokens_as_token_ids) if body.logprobs else None,
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


def max_model_len(engine) -> int | None:
    """The longest prompt + generation the model takes (vLLM's max_model_len): the shortest context of the
    models it runs, since a request is checked against each (None: none of them says)."""
    limits = [engine.context_limit(stream.model) for stream in engine.streams.values()]
    return min((n for n in limits if n is not None), default=None)


def logprob_count(count: int | None, param: str, vocab_size: int) -> int | None:
    """How many alternatives a position's logprobs carry: as vLLM serving with --max-logprobs -1, any count
    up to the vocabulary, and -1 for all of it."""
    if count is None:
        return None
    if count == -1:
        return vocab_size
    if count < 0:
        raise BadRequest(f"{param} must be 0 or more (or -1 for the whole vocabulary), got {count}", param)
    if count > vocab_size:  # vLLM's words, and the limit's reason
        raise BadRequest(f"Requested sample logprobs of {count}, which is greater than max allowed: {vocab_size} "
                         f"(the model's vocabulary; -1 asks for all of it)", param)
    return count


def chat_top_logprobs(body: ChatBody, vocab_size: int) -> int | None:
    """How many alternatives each token's logprobs carry; None when the request wants no logprobs."""
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return (logprob_count(body.top_logprobs, "top_logprobs", vocab_size) or 0) if body.logprobs else None


def prompt_text(prompt: tuple[str, list[int] | None]) -> str:
    return prompt[0]


async def echo_logprobs(model: Served, prompts, alpha: float | None, top: int) -> list[dict]:
    """Each prompt's own tokens with their log-probabilities under the model at this strength, and at each
    position the `top` likeliest tokens, (text, logprob, id) best first (the first token has none)."""
    engine = model.batcher.engine

    @torch.inference_mode()
    def score():
        out = []
        for text, ids in prompts:
            ids = ids if ids is not None else engine.encode(text)
            tokens = [generated_text(engine.tokenizer, [i]) for i in ids]
            offsets = [len(engine.tokenizer.decode(ids[:i])) for i in range(len(ids))]
            echoed = {"ids": list(ids), "tokens": tokens, "offsets": offsets, "end": len(engine.tokenizer.decode(ids)),
                      "token_logprobs": [None] * len(ids), "top": [None] * len(ids)}
            if len(ids) > 1:
                s = engine.score_tokens([(text, ids[:1], ids[1:])], alpha=alpha, top_k=top)[0]
                ranked = zip(s["top_k_ids"], s["top_k_logprobs"]) if top else [((), ())] * (len(ids) - 1)
                alternatives = [[(generated_text(engine.tokenizer, [i]), lp, i) for i, lp in zip(best, lps)]
                                for best, lps in ranked]
                echoed.update(token_logprobs=[None] + s["token_logprobs"], top=[None] + alternatives)
            out.append(echoed)
        return out

    return await asyncio.wrap_future(model.batcher.run(score))


def completion_logprobs(tokens: list[dict], echoed: dict | None, offset: int = 0, as_ids: bool = False) -> dict:
    """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs (the alternatives and the token
    itself), text_offset (from offset, the length of the text before these tokens). `as_ids`: tokens and
    keys written "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echoed is not None:
        for token_id, text, logprob, top, at in zip(echoed["ids"], echoed["tokens"], echoed["token_logprobs"],
                                                    echoed["top"], echoed["offsets"]):
            out["tokens"].append(token_name(text, token_id, as_ids))
            out["token_logprobs"].append(None if logprob is None else finite(logprob))
            out["top_logprobs"].append(None if top is None else alternatives(top, (text, logprob, token_id), as_ids))
            out["text_offset"].append(at)
        offset = echoed["end"]
    for t in tokens:
        out["tokens"].append(token_name(t["token"], t["token_id"], as_ids))
        out["token_logprobs"].append(finite(t["logprob"]))
        out["top_logprobs"].append(alternatives(t["top_logprobs"], (t["token"], t["logprob"], t["token_id"]), as_ids))
        out["text_offset"].append(offset)
        offset += len(t["text"])
    return out


def token_name(text: str, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else text


def finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # as vLLM writes -inf: JSON has no infinity


def alternatives(top: list[tuple[str, float, int]], token: tuple[str, float, int], as_ids: bool) -> dict[str, float]:
    """The completion form's {token: logprob}: the position's own token, then the top alternatives best
    first, as vLLM orders them (up to logprobs + 1 entries, as in OpenAI's). By text, tokens that print
    alike share the first one's key; by id, every one has its own."""
    out: dict[str, float] = {}
    for text, logprob, token_id in [token, *top]:
        out.setdefault(token_name(text, token_id, as_ids), finite(logprob))
    return out


def chat_logprobs(tokens: list[dict], top: int, as_ids: bool = False) -> dict:
    """OpenAI's chat logprobs: per token its text (or "token_id:N"), logprob, UTF-8 bytes of its text and
    top alternatives."""

    def entry(text: str, logprob: float, token_id: int) -> dict:
        return {"token": token_name(text, token_id, as_ids), "logprob": finite(logprob),
                "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t["token"], t["logprob"], t["token_id"]),
                         "top_logprobs": [entry(*alt) for alt in t["top_logprobs"][:top]]} for t in tokens]}


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


async def completion_chunks(events, head: dict, body, prompts, echoed=None, echo_only: bool = False):
    offsets = [0] * len(prompts)  # each choice's text so far, for text_offset
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    as_ids = body.return_tokens_as_token_ids
    if body.echo:
        for i, p in enumerate(prompts):
            offsets[i] = len(prompt_text(p))
            logprobs = completion_logprobs([], echoed[i], as_ids=as_ids) if echoed else None
            echoed_choice = {"index": i, "text": prompt_text(p), "logprobs": logprobs, "finish_reason": None}
            yield {**head, "choices": [echoed_choice]}
    async for index, event in events:
        choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
        if event["type"] == "error":
            yield {**head, "error": {"message": event["message"], "type": "server_error"}}
            return
        if event["type"] == "token":
            if echo_only:
                continue
            choice["text"] = event["text"]
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs([event], None, offsets[index], as_ids)
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


async def chat_chunks(events, head: dict, body, top: int | None):
    as_ids = body.return_tokens_as_token_ids
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    async for index, event in events:
        if event["type"] == "error":
            yield {**head, "error": {"message": event["message"], "type": "server_error"}}
            return
        if event["type"] == "token":
            choice = {"index": index, "delta": {"content": event["text"]}, "finish_reason": None,
                      "logprobs": chat_logprobs([event], top, as_ids) if body.logprobs else None}
            if body.diagnostics and "diagnostics" in event:
                choice["diagnostics"] = event["diagnostics"]
        else:
            choice = {"index": index, "delta": {}, "finish_reason": FINISH[event["finish_reason"]]}
            usage["prompt_tokens"] += event["prompt_tokens"]
            usage["completion_tokens"] += event["completion_tokens"]
        yield {**head, "choices": [choice]}
    if wants_usage(body):
        yield usage_chunk(head, usage)
