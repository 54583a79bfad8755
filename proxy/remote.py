"""A base you cannot load: a model behind an OpenAI-compatible server (vLLM, this project's proxy.serve),
steered through nothing but its next-token log-probabilities, as the paper's black-box setting has it.

    python -m proxy.run base=http://HOST:PORT/v1 expert=... prompts=...
        load.base.model=<served id>          default: the one model /v1/models lists
        load.base.tokenizer=<folder or id>   default: the expert's (checked against the server's tokenization)
        load.base.top_logprobs=K             default: the most the server gives (vLLM: --max-logprobs)
        load.base.api_key_env=NAME           the bearer key is read from that environment variable

At each step every row asks the server, in its own request (the rows of a batch at once), for the base's
top-K log-probabilities after the row's token ids: `/v1/completions` with a token-id prompt, `max_tokens: 1`,
`logprobs: K` and vLLM's `return_tokens_as_token_ids`, so that no id is ever re-read from text. A
speculative round asks once per row with `echo`, whose log-probabilities cover every drafted position.
What the server does not list, `load.base.outside` decides (with K covering the vocabulary nothing is
unlisted, and both rules are the base's own law):
- `spread` (default): the probability the base left to the tokens it did not list, spread evenly over
  them, log((1 - sum of the K listed) / (V - K)): the offset can still lift such a token where the expert
  wants it (the end of an answer that the untuned base would go on from), as it would with the whole law;
- `zero`: the proxy distribution is taken over the base's top K only (every other token scores OUTSIDE,
  probability 0), the paper's setting for its API experiment.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig

from core.errors import UserError

# what a token outside the base's top K scores under outside=zero (and at a position no row asked for): its
# probability is 0, and every rule of the engine
# (the plausibility constraint's RULED_OUT, a processor's -inf) still orders what it keeps above it
OUTSIDE = -1e6
OUTSIDE_RULES = ("spread", "zero")
PROBE = "The quick brown fox jumps over the lazy dog. 1, 2, 3: naïve café!"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def whole_number(name: str, value: Any, low: int) -> int:
    """A served-base option that must be a whole number of at least `low`, or one line saying so."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text) or int(text) < low:
        raise UserError(f"load.base.{name} (lm-eval: base_{name}) must be a whole number of at least {low}, "
                        f"got {value!r}")
    return int(text)


def seconds(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise UserError(f"load.base.{name} (lm-eval: base_{name}) must be a number of seconds above 0, got {value!r}")
    return number


class Client:
    """JSON over HTTP to one server: bounded retries with exponential backoff on what may pass (a refused or
    dropped connection, a time-out, 429, 5xx, an answer that is not the JSON asked for), then one line
    naming the URL and what it answered. The key goes in a header only, never in a message."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 4,
                 backoff: float = 0.5, workers: int = 16):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers))
        self.retries, self.backoff = int(retries), float(backoff)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="proxy-remote")
        self.requests = 0  # every request sent, retries included
        self._count = threading.Lock()

    def call(self, method: str, path: str, body: dict | None = None,
             read: Callable[[Any], Any] = lambda data: data) -> Any:
        """`read(answer JSON)` of one request; what `read` cannot find (KeyError, TypeError, ValueError)
        counts as a malformed answer."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 8.0))
            with self._count:
                self.requests += 1
            try:
                response = self.http.request(method, self.url + path, json=body)
            except httpx.HTTPError as err:
                last = f"no answer ({type(err).__name__}: {str(err).strip() or 'connection failed'})"
                continue
            if response.status_code in RETRY_STATUS:
                last = f"{response.status_code} {error_text(response)}"
                continue
            if response.status_code >= 400:
                wrong = response.status_code == 404 and not self.url.endswith("/v1")
                hint = "; a base URL ends in /v1" if wrong else ""
                raise UserError(f"the base at {self.url}{path} answered {response.status_code}: "
                                f"{error_text(response)}{hint}")
            try:
                return read(response.json())
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
                if isinstance(err, UserError):
                    raise
                last = f"an answer that is not the JSON expected ({type(err).__name__}: {str(err)[:120]})"
        tries = f"{self.retries + 1} {'try' if self.retries == 0 else 'tries'}"
        hint = " (a base URL ends in /v1)" if not self.url.endswith("/v1") else ""
        raise UserError(f"the base at {self.url}{path} gave {last} after {tries}; "
                        f"check that the server is up and serving this model{hint}")

    def map(self, fn: Callable, items: Sequence) -> list:
        """fn over the items at once (the rows of a batch), in order."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self.pool.map(fn, items))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.http.close()


def error_text(response) -> str:
    """The server's own words for an error (OpenAI's {"error": {"message"}}, FastAPI's "detail"), one line."""
    try:
        data = response.json()
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        message = message or data.get("message") or data.get("detail")
    except ValueError:
        message = response.text
    return " ".join(str(message or response.reason_phrase).split())[:300]


def token_id(key: str, url: str) -> int:
    if not key.startswith("token_id:"):
        raise UserError(f"the base at {url} names tokens by their text ({key!r}), not by id: it needs vLLM's "
                        "return_tokens_as_token_ids (vLLM and this project's proxy.serve have it)")
    return int(key[len("token_id:"):])


class RemoteBase(GenerationMixin):
    """The served base as the engine reads a model: its tokenizer, config and generation config (for the
    processors and the ids it ends on), its context, and `open_stream()` in place of a KV cache."""

    remote = True

    def __init__(self, url: str, tokenizer, model: str | None = None, top_logprobs: int | None = None,
                 api_key_env: str | None = None, config: PretrainedConfig | None = None,
                 generation_config: GenerationConfig | None = None, timeout: float = 60.0, retries: int = 4,
                 outside: str = "spread", check_tokenizer: bool = True):
        if outside not in OUTSIDE_RULES:
            raise UserError(f"load.base.outside (lm-eval: base_outside) must be spread or zero, got {outside!r}: "
                            "what an unlisted token scores (spread: the base's leftover probability shared evenly; "
                            "zero: nothing)")
        self.outside = outside
        key = None
        if api_key_env:
            key = os.environ.get(str(api_key_env))
            if not key:
                raise UserError(f"load.base.api_key_env={api_key_env} (lm-eval: base_api_key_env) names no set "
                                f"environment variable; export {api_key_env}=<the server's key>")
        self.client = Client(url, key, timeout=seconds("timeout", timeout), retries=whole_number("retries", retries, 0))
        self.url, self.tokenizer = self.client.url, tokenizer
        self.vocab_size = len(tokenizer)
        self.model, max_len = self._served_model(model)
        self.config = config or PretrainedConfig()
        if max_len:
            self.config.max_position_embeddings = int(max_len)
        self.generation_config = generation_config or GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        self.top_logprobs = self._top_logprobs(top_logprobs)
        if check_tokenizer:
            self._check_tokenizer()

    # -- what the server serves -----------------------------------------------------------------------
    def _served_model(self, model: str | None) -> tuple[str, int | None]:
        served = self.client.call("GET", "/models", read=lambda d: [(m["id"], m.get("max_model_len"))
                                                                   for m in d["data"]])
        ids = [name for name, _ in served]
        if model is None:
            if len(ids) != 1:
                raise UserError(f"the server at {self.url} serves {len(ids)} models ({', '.join(ids) or 'none'}); "
                                "choose one with load.base.model=<id>")
            model = ids[0]
        if model not in ids:
            raise UserError(f"the server at {self.url} does not serve '{model}'; it serves {', '.join(ids)}")
        return model, dict(served)[model]

    def _top_logprobs(self, wanted: int | None) -> int:
        """K: as asked, or the most the server gives up to the vocabulary (vLLM's --max-logprobs)."""
        if wanted is not None:
            wanted = whole_number("top_logprobs", wanted, 1)
            if wanted > self.vocab_size:
                raise UserError(f"load.base.top_logprobs must be between 1 and the vocabulary ({self.vocab_size}), "
                                f"got {wanted}")
            self.next_logprobs([self.tokenizer(PROBE)["input_ids"]], wanted)  # refused here, in one line, if too many
            return wanted
        try:
            self.next_logprobs([self.tokenizer(PROBE)["input_ids"]], self.vocab_size)
            return self.vocab_size
        except UserError as err:
            found = re.search(r"max(?:imum)?(?: allowed)?\D{0,20}(\d+)", str(err))
            if not found:
                raise
            return max(1, min(int(found.group(1)), self.vocab_size))

    def _check_tokenizer(self) -> None:
        """The server's ids for a probe text equal the local tokenizer's, or one line saying they do not."""
        body = {"model": self.model, "prompt": PROBE, "max_tokens": 1, "temperature": 0, "echo": True,
                "logprobs": 1, "return_tokens_as_token_ids": True}
        tokens = self.client.call("POST", "/completions", body, read=lambda d: d["choices"][0]["logprobs"]["tokens"])
        served = [token_id(t, self.url) for t in tokens[:-1]]  # the echoed prompt, then the generated token
        local = self.tokenizer(PROBE)["input_ids"]
        if served != local:
            at = next((i for i, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
            raise UserError(f"the base at {self.url} tokenizes a probe text differently from the local tokenizer "
                            f"'{getattr(self.tokenizer, 'name_or_path', '?')}' (from token {at} on); give the served "
                            "model's own with load.base.tokenizer=<its folder or hub id>")

    @property
    def covers_vocabulary(self) -> bool:
        return self.top_logprobs >= self.vocab_size

    # -- log-probabilities -----------------------------------------------------------------------------
    def next_logprobs(self, rows: Sequence[list[int]], k: int | None = None, last: int = 1) -> torch.Tensor:
        """(B, last, V): the base's log-probabilities (its top K; the rest by `outside`) after each row's ids, at its
        last `last` positions (one request per row; with last > 1, an echo). A row shorter than `last`
        scores OUTSIDE at the positions before it starts."""
        k = k or self.top_logprobs

        def ask(ids: list[int]) -> torch.Tensor:
            body = {"model": self.model, "prompt": list(ids), "max_tokens": 1, "temperature": 0, "logprobs": k,
                    "return_tokens_as_token_ids": True}
            if last > 1:
                body["echo"] = True
            tops = self.client.call("POST", "/completions", body,
                                    read=lambda d: d["choices"][0]["logprobs"]["top_logprobs"])
            # echoed: entry p holds the law of token p (the first is null), the last the generated one's
            wanted = tops[len(ids) - last + 1 :] if last > 1 else tops[-1:]
            out = torch.full((last, self.vocab_size), OUTSIDE)
            for i, top in enumerate(wanted[-last:], start=last - len(wanted[-last:])):
                if top is None:
                    continue
                # an echoed position lists its own token beside the top K (vLLM, OpenAI): keep the top K, so
                # that every position reads the same law as a plain round's
                pairs = sorted(((float(v), token_id(key, self.url)) for key, v in top.items()), reverse=True)[:k]
                pairs = [(v, t) for v, t in pairs if t < self.vocab_size]
                if pairs and self.outside == "spread" and len(pairs) < self.vocab_size:
                    left = 1.0 - sum(math.exp(v) for v, _ in pairs)
                    out[i] = math.log(max(left, 1e-12) / (self.vocab_size - len(pairs)))
                if pairs:
                    out[i, [t for _, t in pairs]] = torch.tensor([v for v, _ in pairs])
            return out

        return torch.stack(self.client.map(ask, [list(r) for r in rows]))

    def open_stream(self) -> "RemoteStream":
        return RemoteStream(self)

    # -- what the engine reads of a model ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __repr__(self) -> str:
        return (f"RemoteBase({self.url}, model={self.model!r}, top_logprobs={self.top_logprobs}, "
                f"outside={self.outside!r})")


class RemoteStream:
    """`proxy.streams.ModelStream` for a served base: the rows' ids are kept here (the server keeps no
    state between requests; its prefix cache does the work of a KV cache), so a roll-back is a cut."""

    remote = True

    def __init__(self, base: RemoteBase):
        self.base = base
        self.rows: list[list[int]] = []
        self.forwards = 0  # requests, one per row asked

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, last: int = 1) -> torch.Tensor:
        self.rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        out = self._ask(range(len(self.rows)), last)
        return out[:, -1] if last == 1 else out

    def feed(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Feed n tokens per row (B, n); the logits after each (B, n, V). Rows no longer `active` ask nothing."""
        for row, new in zip(self.rows, tokens.tolist()):
            row.extend(new)
        live = range(len(self.rows)) if active is None else active.nonzero().flatten().tolist()
        return self._ask(live, tokens.shape[1])

    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed(tokens[:, None], active)[:, -1]

    def _ask(self, live, last: int) -> torch.Tensor:
        live = list(live)
        out = torch.full((len(self.rows), last, self.base.vocab_size), OUTSIDE)
        if live:
            out[live] = self.base.next_logprobs([self.rows[r] for r in live], last=last)
            self.forwards += len(live)
        return out

    def keep(self, fed: int, valid: torch.Tensor) -> None:
        for row, v in zip(self.rows, valid.tolist()):
            del row[len(row) - fed + int(v):]

    def join(self, other: "RemoteStream") -> None:
        self.rows += other.rows

    def select(self, rows: list[int]) -> None:
        self.rows = [self.rows[r] for r in rows]
