"""Crash consistency: kill -9 the server at random moments during traffic and frequent snapshots.

Every round: start the server on the same state directory, send traffic from a few clients while it snapshots
every 50 ms, kill -9 it at a random moment. Then every state file on disk must be one complete snapshot of its
component (it passes its checksum and schema check: ``write_atomic`` renames a file only once all of it is on
disk), the restarted server must come up healthy without moving any file aside, remove what an interrupted
snapshot left, and restore exactly what the files hold.

The default suite runs 2 rounds; ``-m slow`` runs 20.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest

from test_server import KEY_A, KEY_B, ServerProcess, auth, metrics

MODEL = "fake-model"


def _load_checked(state: Path) -> dict[str, float]:
    """Load every state file the way the server does, failing on any warning; learned tokens per namespace."""
    from adaspec.control.namespaced import NamespacedController
    from adaspec.serve.auth import tenant_secret
    from adaspec.speculators.suffix import SuffixSpeculator

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        suffix = SuffixSpeculator()
        if (state / "suffix.state").exists():
            assert suffix.load(state / "suffix.state")
        if (state / "controller.state").exists():
            assert NamespacedController().load(state / "controller.state")
        if (state / "tenants.state").exists():
            tenant_secret(state)
    return {ns: float(v["tokens"]) for ns, v in suffix.stats()["namespaces"].items()}


def _traffic(url: str, stop: threading.Event, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            key = rng.choice([KEY_A, KEY_B])
            prompt = rng.choice(["tell me a story", "list primes", "again and again"]) + f" {rng.randrange(5)}"
            try:
                client.post(url + "/v1/completions", headers=auth(key), json={
                    "model": MODEL, "prompt": prompt, "max_tokens": rng.randrange(4, 40), "temperature": 0,
                    "stream": rng.random() < 0.3})
            except httpx.HTTPError:
                return  # the server was killed


def crash_rounds(tmp_path: Path, rounds: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    state = tmp_path / "state"
    args = ["--mode", "adaptive", "--api-key", KEY_A, "--api-key", KEY_B, "--max-tokens-cap", "64",
            "--state-dir", str(state), "--snapshot-interval", "0.05"]
    env = {"FAKE_FORWARD_S": "0.002"}
    for i in range(rounds):
        on_disk = _load_checked(state) if state.exists() else {}
        left = list(state.glob(".*.tmp"))  # by the kill; the running server makes new ones every 50 ms
        srv = ServerProcess(args, "fake", env, tmp_path).wait_ready(60)
        try:
            assert not any(p.exists() for p in left), "temporaries of an interrupted snapshot were not removed"
            restored = {dict(labels)["namespace"]: v for (name, labels), v in metrics(srv.url).items()
                        if name == "adaspec:learned_state_size" and v}
            assert restored == {ns: v for ns, v in on_disk.items() if v}, (i, restored, on_disk)
            stop = threading.Event()
            clients = [threading.Thread(target=_traffic, args=(srv.url, stop, rng.random())) for _ in range(3)]
            for t in clients:
                t.start()
            time.sleep(rng.uniform(0.2, 1.2))
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(10)
            stop.set()
            for t in clients:
                t.join(20)
            assert "damaged" not in srv.output() and "Traceback" not in srv.output(), srv.output()[-2000:]
        finally:
            srv.stop()
        assert not list(state.glob("*.bad-*")), sorted(p.name for p in state.iterdir())
    assert _load_checked(state), "no learned state was ever snapshotted"


def test_kill9_during_snapshots(tmp_path):
    crash_rounds(tmp_path, 2)


@pytest.mark.slow
def test_kill9_during_snapshots_long(tmp_path):
    crash_rounds(tmp_path, 20, seed=1)
