"""``adaspec serve``: run the OpenAI-compatible server (also ``python -m adaspec.serve``).

The socket opens at once (``/health`` answers 503 ``loading`` until the model is ready); SIGTERM or Ctrl-C drains,
then saves the learned state (the sequence is on :func:`cmd_serve`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Callable, Sequence

import uvicorn

from .app import EngineBundle, ServerConfig, ServerState, create_app, load_bundle
from ..args import add_backend_arg
from .auth import ENV_METRICS_KEY, describe, keys_from_env

log = logging.getLogger("adaspec.serve")


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _port(s: str) -> int:
    v = int(s)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..system import MODES

    p.add_argument("--model", default=None, metavar="PATH",
                   help="HF model directory, .gguf file or qwen2.5-coder-0.5b (default: the bundled "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_backend_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accepted bearer key (repeatable; also $ADASPEC_API_KEYS, comma-separated); "
                        "none = no authentication")
    p.add_argument("--metrics-key", default=None, metavar="KEY",
                   help="bearer key /metrics requires (also $ADASPEC_METRICS_KEY); none = /metrics is open")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="learned state: restored at start, snapshotted on an interval and at shutdown")
    p.add_argument("--shared-namespace", action="store_true",
                   help="all keys learn into one namespace (default: one namespace per key)")
    p.add_argument("--mode", choices=MODES, default="adaptive", help="speculation setup (default: adaptive)")
    p.add_argument("--max-active", type=_positive_int, default=8,
                   help="requests generated concurrently, batched step by step (default: 8)")
    p.add_argument("--kv-memory", type=_positive_float, default=4.0, metavar="GIB",
                   help="memory for all running requests' KV caches (torch backend); a request that would "
                        "overflow it waits for a slot (default: 4)")
    p.add_argument("--max-queue", type=_non_negative_int, default=64,
                   help="requests that may wait for a slot; more get 429 (default: 64)")
    p.add_argument("--max-tokens-cap", type=_positive_int, default=None,
                   help="largest max_tokens a request may ask for (default: the model context)")
    p.add_argument("--snapshot-interval", type=_non_negative_float, default=60.0, metavar="S",
                   help="seconds between learned-state snapshots; 0 = only at shutdown (default: 60)")
    p.add_argument("--drain-timeout", type=_non_negative_float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish (default: 30)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the model's forwards (default: torch's choice, one per core); on cores "
                        "shared with other busy processes 1 is often much faster")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: from the model)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on an ``argparse`` subparsers object (``adaspec serve ...``)."""
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server",
                              description="Serve the model over an OpenAI-compatible HTTP API.")
    add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


class UsageError(Exception):
    """A bad argument: one line on stderr, exit status 2."""


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    from ..files import MODEL_ALIASES

    if args.model is not None and args.model not in MODEL_ALIASES and not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or directory")
    if args.state_dir is not None:
        d = Path(args.state_dir)
        if d.exists() and not d.is_dir():
            raise UsageError(f"--state-dir {args.state_dir}: not a directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--state-dir {args.state_dir}: {e.strerror}") from None
        if not os.access(d, os.W_OK):
            raise UsageError(f"--state-dir {args.state_dir}: not writable")
    keys = tuple(args.api_key) + tuple(keys_from_env())
    try:
        return ServerConfig(model=args.model, device=args.device, backend=args.backend, threads=args.threads,
                            mode=args.mode, state_dir=args.state_dir,
                            api_keys=keys, shared_namespace=args.shared_namespace, max_active=args.max_active,
                            max_queue=args.max_queue, kv_memory_gib=args.kv_memory, max_tokens_cap=args.max_tokens_cap,
                            snapshot_interval=args.snapshot_interval, drain_timeout=args.drain_timeout,
                            served_model_name=args.served_model_name,
                            metrics_key=args.metrics_key or os.environ.get(ENV_METRICS_KEY) or None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_serve(args: argparse.Namespace, loader: Callable[[ServerConfig], EngineBundle] = load_bundle) -> int:
    """Serve until a signal: load in the background, drain, save.

    The HTTP socket opens at once and ``/health`` answers 503 ``loading`` until the
    model is loaded and the learned state restored. SIGTERM or Ctrl-C drains:
    admissions stop (``/health`` 503 ``draining``, generation routes 503), running
    requests get ``--drain-timeout`` seconds to finish and are cancelled after
    that, then the engine thread stops and the learned state is saved. A second
    signal exits at once, with status 128 + the signal number as a shell reports
    a process killed by it (the learned state then is as of the last snapshot).
    """
    try:
        cfg = config_from_args(args)
    except UsageError as e:
        print(f"adaspec serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    log.info("serving on http://%s:%d with %s%s", args.host, args.port, describe(cfg.api_keys),
             ", one shared namespace" if cfg.shared_namespace and cfg.api_keys else "")
    code = run(cfg, args.host, args.port, access_log=args.access_log, log_level=args.log_level, loader=loader)
    if code > 128:
        # A forced exit leaves the engine thread running: skip the interpreter's finalisation, where a daemon
        # thread still writing to a stream aborts the process (SIGABRT) instead of exiting with this status.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(cfg: ServerConfig, host: str, port: int, access_log: bool = False, log_level: str = "info",
        loader: Callable[[ServerConfig], EngineBundle] = load_bundle) -> int:
    """Serve until a signal; 0 after a clean drain, 1 if the model could not be loaded, 128 + the signal number
    when a second signal cut the drain short."""
    app = create_app(cfg, loader)
    state = app.state.adaspec
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", access_log=access_log, log_level=log_level,
                            timeout_graceful_shutdown=5)
    server = _DrainingServer(config, state, cfg.drain_timeout)
    failed: list[str] = []

    def fatal(msg: str) -> None:
        failed.append(msg)
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    if failed:
        print(f"adaspec serve: error: could not load the model: {failed[0]}", file=sys.stderr)
        return 1
    if server.forced_by is not None:
        log.warning("stopped by a second signal without draining")
        return 128 + server.forced_by
    return 0


class _DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGINT/SIGTERM drains before exiting (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._drain_asked = False
        self._deadline: float | None = None
        self._cancelled = False
        self.forced_by: int | None = None
        """The signal that forced an exit without draining, if one did."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Only flags here: a signal handler must not take locks the interrupted code may hold.
        if self._drain_asked or self.state.status not in ("ready", "draining"):
            self.should_exit = True
            self.force_exit = self._drain_asked
            if self._drain_asked:
                self.forced_by = int(sig)
            return
        self._drain_asked = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self._drain_asked:
            return False
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.drain_timeout
            self.state.begin_drain()
        if self.state.drained:
            return True
        if now >= self._deadline and not self._cancelled:
            self._cancelled = True
            self.state.cancel_running()
        return False


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adaspec serve",
                                 description="Serve the model over an OpenAI-compatible HTTP API.")
    add_arguments(ap)
    return cmd_serve(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
