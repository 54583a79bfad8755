"""Serving benchmark: the proxy-tuned model behind the OpenAI-compatible server, asked by 16 concurrent
clients against one client asking the same requests one at a time; throughput and time to first token.

    make bench                                   # after `make demo`: the embedded family
    python -m scripts.bench_serving --clients 16 --requests 8 --max-tokens 32

Both runs go through HTTP to `python -m proxy.serve` on 127.0.0.1, in its own process (greedy, streamed,
the held-out questions of the embedded task). Prints tokens/s, the speed-up, and time-to-first-token percentiles, and
writes them as JSON (path on the last line). Timing is for reading, never asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from core import PROJECT_ROOT
from core.errors import UserError, exit_on_user_error
from core.files import atomic_write_json, read_jsonl

CLIENTS = threading.local()  # one keep-alive connection per client thread


def ask(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed greedy completion: (seconds to the first token, seconds in all, tokens)."""
    if not hasattr(CLIENTS, "http"):
        CLIENTS.http = httpx.Client(timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, tokens = time.perf_counter(), None, 0
    with CLIENTS.http.stream("POST", f"{url}/v1/completions", json=body) as answer:
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["finish_reason"] is None:  # one chunk per token (its text may be held back)
                tokens += 1
                first = first if first is not None else time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), time.perf_counter() - start, tokens


def load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Every prompt asked by `clients` clients at once (1: one after another)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda p: ask(url, model, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(prompts), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "ttft_p50_s": round(statistics.median(ttft), 4),
            "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 4)}


@contextlib.contextmanager
def server(overrides: list[str]):
    """`python -m proxy.serve` in its own process (its own interpreter lock, as in production) on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "proxy.serve", f"server.port={port}", "logger=none",
                             "server.log_level=warning", *overrides], cwd=PROJECT_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(f"the server did not start: {proc.stderr.read().strip().splitlines()[-1:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="tiny-large")
    parser.add_argument("--expert", default="tiny-expert-lora", help="a registered name or a checkpoint folder")
    parser.add_argument("--prompts-file", default=str(PROJECT_ROOT / ".cache" / "tiny-family" / "task" / "test.jsonl"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "serving.json"))
    args = parser.parse_args()

    questions = [str(r["prompt"]) for r in read_jsonl(args.prompts_file, required=["prompt"])]
    prompts = [questions[i % len(questions)] for i in range(args.clients * args.requests)]
    overrides = [f"base={args.base}", f"expert={args.expert}", f"server.max_batch={args.max_batch}",
                 "server.max_queue=1024", "server.serve_expert=false"]
    with server(overrides) as (url, model):
        ask(url, model, prompts[0], 4)  # warm-up
        alone = load(url, model, prompts, 1, args.max_tokens)
        together = load(url, model, prompts, args.clients, args.max_tokens)
    speedup = together["tokens_per_s"] / alone["tokens_per_s"]
    report = {"model": model, "max_tokens": args.max_tokens, "one_at_a_time": alone,
              f"{args.clients}_concurrent": together, "speedup": round(speedup, 2)}
    print(f"{'clients':>8} {'requests':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p90':>9}")
    for run in (alone, together):
        print(f"{run['clients']:>8} {run['requests']:>8} {run['tokens_per_s']:>9} {run['ttft_p50_s']:>8}s "
              f"{run['ttft_p90_s']:>8}s")
    print(f"{args.clients} concurrent clients: {speedup:.2f}x the throughput of one client at a time")
    atomic_write_json(Path(args.out), report)
    print(args.out)


if __name__ == "__main__":
    main()
