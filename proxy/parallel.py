"""The small models in a second process, running while the base runs in this one.

At the sizes where the small models' forwards are not negligible beside the base's (a CPU, or a
7B pair beside a 13B base), running the expert and anti-expert one after the other costs ~1 + 2/r
of the base alone. A forked worker process holds them and computes their logits at the same time
as the base: per step one tiny message each way, the token ids and the logits travelling through
shared-memory buffers allocated once per batch (a tensor sent through a pipe would make a new
shared segment every step). Measured here (embedded family, batch 8): 1.78x the base loop's time
sequentially, 1.12-1.16x in parallel. CPU only: forking a process that has initialised CUDA is unsafe.
"""
from __future__ import annotations

import multiprocessing as mp
import os

import torch

from core.errors import UserError
from proxy.streams import ModelStream


def parallel_available() -> bool:
    return (os.cpu_count() or 1) > 1 and not torch.cuda.is_initialized() and "fork" in mp.get_all_start_methods()


def _serve(conn, models: dict) -> None:
    torch.set_num_threads(1)
    streams = {key: ModelStream(model) for key, model in models.items()}
    out = tokens = None
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "prefill":
                padded = msg[1]
                batch = next(iter(padded.values()))[0].shape[0]
                first = {key: streams[key].prefill(*padded[key]) for key in streams}
                # one buffer per model at its own logit width (ids past the shared vocabulary may be folded)
                out = {key: torch.empty(lg.shape).share_memory_() for key, lg in first.items()}
                for key, lg in first.items():
                    out[key].copy_(lg)
                tokens = torch.zeros(batch, dtype=torch.long).share_memory_()
                conn.send(("ok", out, tokens))
            elif msg[0] == "step":
                for key, stream in streams.items():
                    out[key].copy_(stream.step(tokens))
                conn.send(("ok",))
            else:
                return
        except Exception as err:  # reported in the parent, where the user sees it
            conn.send(("error", f"{type(err).__name__}: {err}"))


class ParallelStreams:
    """Streams of the given models (key -> model) served by one forked worker process."""

    def __init__(self, models: dict):
        if not parallel_available():
            raise UserError("proxy.parallel needs a CPU machine with more than one core (and no CUDA in use)")
        ctx = mp.get_context("fork")
        self.keys = list(models)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, models), daemon=True)
        self.proc.start()
        self.out = self.tokens = None

    def _reply(self):
        reply = self.conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"the small-model worker failed: {reply[1]}")
        return reply

    def prefill(self, padded: dict) -> dict:
        """Prefill every stream with its (ids, mask); return their last logits, key -> (B, V)."""
        self.conn.send(("prefill", {key: padded[key] for key in self.keys}))
        _, self.out, self.tokens = self._reply()
        return {key: buf.clone() for key, buf in self.out.items()}

    def submit(self, tokens: torch.Tensor) -> None:
        """Start one step on the worker; `collect` waits for it."""
        self.tokens.copy_(tokens)
        self.conn.send(("step",))

    def collect(self) -> dict:
        self._reply()
        return {key: buf.clone() for key, buf in self.out.items()}

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("quit",))
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
