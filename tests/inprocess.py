"""The server app on 127.0.0.1 in this process (uvicorn in a thread) with the stand-in model of test_server."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import uvicorn

from adaspec.bench.load import wait_healthy
from adaspec.bench.servers import free_port
from adaspec.serve.app import EngineBundle, ServerConfig, _engine_snapshot, _engine_state_sizes, create_app
from adaspec.system import build_engine
from test_server import FakeModel, FakeTokenizer


def loader_with(tokenizer=None, forward_s: float = 0.0):
    """A loader of the stand-in model with ``tokenizer`` (default ``FakeTokenizer()``)."""

    def load(cfg: ServerConfig) -> EngineBundle:
        tok = tokenizer or FakeTokenizer()
        engine = build_engine(FakeModel(forward_s), tok, cfg.mode, state_dir=cfg.state_dir,
                              shared_learning=not cfg.isolated_tenants)
        return EngineBundle(engine, tok, "fake-model", _engine_snapshot(engine), _engine_state_sizes(engine))

    return load


@contextlib.contextmanager
def serving(cfg: ServerConfig, loader) -> Iterator[str]:
    """Yields the base URL once /health is 200; shuts the server down (lifespan included) afterwards."""
    app = create_app(cfg, loader)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, 30, interval=0.05):
        raise RuntimeError("in-process server not ready")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
