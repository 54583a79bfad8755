"""Serve the proxy-tuned model over HTTP in OpenAI's protocol, with a page that shows what the expert changed.

    python -m proxy.serve base=llama2-70b expert=<registered name> server.port=8000
    make serve                                     # the embedded family's model, after `make demo`

Three models are served: the proxy-tuned base (`<base>+<expert>`, or server.model_name), the base alone
(alpha 0 through the same batch) and, with server.serve_expert, the expert alone (reading its own prompt
format). Concurrent requests share continuously batched decoding (proxy/batcher.py).
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import hydra
from omegaconf import DictConfig

from core.errors import UserError, exit_on_user_error
from core.registry import display_name
from proxy.api import Served, create_app
from proxy.batcher import Batcher
from proxy.build import build_engine
from proxy.engine import ProxyEngine
from proxy.options import generation_settings


def served_models(cfg: DictConfig) -> list[Served]:
    """Load the models once and set up a batcher for the proxy-tuned base and one for the expert alone."""
    if (cfg.proxy.get("speculative") or {}).get("k") is not None or cfg.proxy.get("parallel"):
        raise UserError("proxy.serve batches requests continuously with the plain engine; drop proxy.speculative.k "
                        "and proxy.parallel")
    if not cfg.get("expert"):
        raise UserError("no expert given: pass expert=<checkpoint folder or registered name>")
    engine, pairs = build_engine(cfg)
    server = cfg.server
    proxy = Batcher(engine, server.max_batch, server.max_queue)
    name = server.get("model_name") or f"{display_name(cfg.base)}+{display_name(pairs[0].name)}"
    models = [Served(name, "proxy", proxy), Served(display_name(cfg.base), "base", proxy, alpha=0.0)]
    if server.get("serve_expert") and not engine.pairs[0].shared:
        pair = engine.pairs[0]
        alone = ProxyEngine(pair.expert, pair.tokenizer or engine.tokenizer, base_format=pair.expert_format)
        models.append(Served(display_name(pairs[0].name), "expert", Batcher(alone, server.max_batch, server.max_queue)))
    return models


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """The app served by uvicorn in a background thread (port 0: a free one); its base URL. For tests,
    benchmarks and notebooks."""
    import uvicorn

    if not port:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise UserError(f"the server could not start on {host}:{port}")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve(cfg: DictConfig) -> None:
    import uvicorn

    try:
        port = int(cfg.server.port)
    except (TypeError, ValueError):
        raise UserError(f"server.port must be a port number, got {cfg.server.port!r}") from None
    with socket.socket() as sock:  # before the models load: a port in use is the user's to change
        # as uvicorn binds: a port whose last server just closed (connections in TIME_WAIT) is free to take
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.server.host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {cfg.server.host}:{port} ({err.strerror}); "
                            "choose another server.port or server.host") from None
    models = served_models(cfg)
    app = create_app(models, generation_settings(cfg.generation))
    print(f"serving {', '.join(m.name for m in models)} at http://{cfg.server.host}:{cfg.server.port}/", flush=True)
    try:
        uvicorn.run(app, host=cfg.server.host, port=port, log_level=cfg.server.log_level)
    finally:
        for batcher in {id(m.batcher): m.batcher for m in models}.values():
            batcher.close()


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
