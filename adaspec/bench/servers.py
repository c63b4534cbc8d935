"""Inference servers the benchmarks start themselves: ``adaspec serve`` and llama-server, each a subprocess on a free
loopback port, ready when its ``/health`` answers, stopped with SIGTERM.

llama-server is the peer CPU users run (continuous batching over parallel slots, and its own speculative modes). It
is built from the llama.cpp that the pinned llama-cpp-python vendors (:mod:`adaspec.llamacpp_build`). Every
configuration gets a fresh process, since ``ngram-mod``'s table outlives requests, with the same GGUF, the same
threads, flash attention on and the prompt cache off.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .load import wait_healthy


@dataclass(frozen=True)
class LlamaServerSetup:
    """One llama-server configuration: its speculation flags, and whether it needs a draft model."""

    flags: tuple[str, ...]
    needs_draft: bool = False


LLAMA_SERVER_SETUPS = {
    "llama-server": LlamaServerSetup(()),  # plain decoding
    # ngram-mod at its defaults (24-token match, drafts of 48-64 tokens)
    "llama-server-ngram": LlamaServerSetup(("--spec-type", "ngram-mod")),
    # ngram-mod with the shortest match it takes without a warning (16), and drafts of 2-16 tokens
    "llama-server-ngram-tuned": LlamaServerSetup(
        ("--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "16", "--spec-ngram-mod-n-min", "2",
         "--spec-ngram-mod-n-max", "16")),
    # a draft model (--draft-model, same tokenizer) with llama.cpp's own draft settings
    "llama-server-draft": LlamaServerSetup(("--spec-type", "draft-simple"), needs_draft=True),
}
"""The llama-server peers by name. The model-free types take their lengths from their own flags, not from
``--spec-draft-n-max``; ``-md`` alone enables nothing, ``--spec-type draft-simple`` does."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_command(binary: str | os.PathLike, setup: str, gguf: str | os.PathLike, port: int, threads: int,
                         parallel: int = 1, ctx_per_slot: int = 4096,
                         draft_model: str | os.PathLike | None = None) -> list[str]:
    """The command line of one llama-server configuration (``LLAMA_SERVER_SETUPS``) on 127.0.0.1:``port``.

    ``parallel`` slots share one KV cache of ``parallel * ctx_per_slot`` cells (llama-server divides its context
    among the slots), so each slot holds a whole request.
    """
    if setup not in LLAMA_SERVER_SETUPS:
        raise ValueError(f"unknown llama-server setup {setup!r}; choose from {', '.join(LLAMA_SERVER_SETUPS)}")
    spec = LLAMA_SERVER_SETUPS[setup]
    if spec.needs_draft and draft_model is None:
        raise ValueError(f"{setup} needs a draft model (--draft-model PATH, a GGUF with the target's tokenizer)")
    if parallel < 1 or threads < 1:
        raise ValueError("parallel and threads must be >= 1")
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-fa", "on", "-c", str(parallel * ctx_per_slot),
           "-np", str(parallel), "--no-cache-prompt", "--cache-ram", "0", "--metrics", "--no-webui"]
    cmd += spec.flags
    if spec.needs_draft:
        cmd += ["-md", str(draft_model), "-td", str(threads), "-tbd", str(threads)]
    return cmd


def adaspec_server_command(port: int, mode: str, model: str | None = None, threads: int | None = None,
                           extra: Sequence[str] = ()) -> list[str]:
    """``adaspec serve`` in ``mode`` on 127.0.0.1:``port`` (an open server, learning shared by all requests)."""
    cmd = [sys.executable, "-m", "adaspec.serve", "--host", "127.0.0.1", "--port", str(port), "--mode", mode]
    if model:
        cmd += ["--model", str(model)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd + list(extra)


class ManagedServer:
    """A server subprocess on 127.0.0.1: started at construction, ``wait_ready()`` until ``/health`` answers,
    ``stop()`` (SIGTERM or the signal given, then SIGKILL after ``timeout``). Its output goes to a log file (in
    ``log_dir``, else the system's temporary directory), quoted in errors."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        fd, path = tempfile.mkstemp(prefix=f"adaspec-{name}-", suffix=".log", dir=log_dir)
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "w")
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                         env={**os.environ, **(env or {})}, start_new_session=True)
        except OSError as e:
            self._log.close()
            raise RuntimeError(f"{name}: cannot start {cmd[0]}: {e}") from e

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int | None = 3000) -> str:
        """The end of the server's log (``tail`` characters; None: all of it)."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def wait_ready(self, timeout: float = 600.0) -> "ManagedServer":
        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")

        if not wait_healthy(self.url, timeout, interval=0.25, check=alive):
            self.stop()
            raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.output()}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ManagedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_llama_server(setup: str, gguf: str | os.PathLike, threads: int, parallel: int = 1,
                       ctx_per_slot: int = 4096, draft_model: str | os.PathLike | None = None,
                       timeout: float = 600.0) -> ManagedServer:
    """A ready llama-server of ``setup`` (built first if this machine has none: :func:`llamacpp_build.find_server`,
    whose :class:`~adaspec.llamacpp_build.BuildError` says why when it cannot be)."""
    from ..llamacpp_build import find_server

    port = free_port()
    cmd = llama_server_command(find_server(), setup, gguf, port, threads, parallel, ctx_per_slot, draft_model)
    return ManagedServer(setup, cmd, port).wait_ready(timeout)
