"""The verification cost curve c(k): seconds of one target forward over k new tokens.

Speculation pays when accepting E tokens per step outweighs verifying k: throughput = (E + 1) / (draft cost + c(k)),
so the controller needs c(k) for this target on this machine. :func:`measure_costs` times it (chains, trees, plain
decoding, the LM head); the command line puts llama.cpp beside it in the same run::

    python -m adaspec.bench.cost_curve --threads 2 --out costs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

DEFAULT_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

__all__ = ["measure_costs", "LlamaCppCosts", "DEFAULT_KS", "main"]


def _context_ids(n: int, vocab: int) -> list[int]:
    """A fixed, token-diverse context (costs do not depend on which ids)."""
    return [(1009 + 7919 * i) % vocab for i in range(n)]


def _binary_tree(k: int) -> list[int]:
    return [-1] + [(i - 1) // 2 for i in range(1, k)]


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if not n:  # leave torch's settings alone: set_num_threads also resets MKL's and the pthreadpool's
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _median_ms(xs: Sequence[float]) -> float:
    return statistics.median(xs) * 1e3


class _OursTimer:
    """Times forwards of an adaspec target after a committed context."""

    def __init__(self, model: Any, context_len: int):
        self.model = model
        self.context = _context_ids(context_len, model.vocab_size)
        self.cache = model.new_cache()
        model.prefill(self.cache, self.context)

    def verify(self, k: int, tree: bool) -> float:
        toks = _context_ids(k + 3, self.model.vocab_size)[3:]
        parents = _binary_tree(k) if tree else None
        t = time.perf_counter()
        self.model.forward(self.cache, toks, parents)
        return time.perf_counter() - t

    def head(self, k: int) -> float | None:
        """Seconds of the LM head alone over ``k`` rows (``None`` for a target without one)."""
        lm_head = getattr(self.model, "lm_head", None)
        if lm_head is None or self.model.backend != "torch":
            return None
        x = torch.randn(k, self.model.hidden_size, generator=torch.Generator().manual_seed(k))
        t = time.perf_counter()
        lm_head(x)
        return time.perf_counter() - t

    def plain(self, n: int) -> float:
        """Seconds per token of greedy decoding for ``n`` tokens; the cache is rolled back afterwards."""
        start, tok = self.cache.length, self.context[-1]
        t = time.perf_counter()
        for _ in range(n):
            out = self.model.forward(self.cache, [tok])
            tok = int(out.logits[0].argmax())
            self.cache.commit([0])
        dt = time.perf_counter() - t
        self.cache.truncate(start)
        return dt / n


def measure_costs(model: Any, ks: Sequence[int] = DEFAULT_KS, reps: int = 15, context_len: int = 100,
                  tree: bool = True, decode_tokens: int = 32, threads: int | None = None,
                  peer: "LlamaCppCosts | None" = None, others: dict[str, Any] | None = None) -> dict:
    """c(k) of ``model`` (any ``TargetModel``) and, with ``peer``, of llama.cpp timed in the same loop.

    Returns ``{"verify": {k: s}, "tree": {k: s}, "plain_tok_s": x, "verify_ms": ..., ...}``
    plus ``"llama_cpp": {...}`` with the same keys when a peer is given, and ``"backends": {name: {...}}`` for
    each of ``others`` (more targets, e.g. the same file on another backend, timed in the same loop).

    It times, after a context of ``context_len`` committed tokens:

    * ``verify[k]``: a chain of k tokens (the pending token + k - 1 draft tokens);
    * ``tree[k]``: k tokens as a binary tree (``parents[i] = (i - 1) // 2``);
    * ``plain_tok_s``: greedy decoding one token per forward (argmax + commit).
    * ``head_ms``: the LM head alone over k rows (part of c(k)).

    Each value is the median over ``reps`` repetitions, sizes interleaved, with
    nothing committed between verify timings (the next forward overwrites the rows).
    The command line puts llama.cpp (llama-cpp-python on the same GGUF, same thread
    count, logits for all k rows) beside it in the same run, interleaved, so both
    see the same machine load::

        python -m adaspec.bench.cost_curve --threads 2 --out costs.json

    The JSON holds ``verify`` at the top level, so ``control.costs.load_cost_curve``
    reads it as a recorded curve.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError("ks must be positive token counts")
    if reps < 1 or context_len < 1:
        raise ValueError("reps and context_len must be positive")
    if context_len + max(ks) + decode_tokens > model.max_context:
        raise ValueError(f"context {context_len} + {max(ks)} tokens exceeds the model context {model.max_context}")
    with _threads(threads):
        ours = _OursTimer(model, context_len)
        more = {name: _OursTimer(m, context_len) for name, m in (others or {}).items()}
        for k in ks:  # warm-up: first calls allocate and pack
            ours.verify(k, False)
            for o in more.values():
                o.verify(k, False)
            if peer:
                peer.verify(k)
        more_chain = {name: {k: [] for k in ks} for name in more}
        more_tree = {name: {k: [] for k in ks} for name in more}
        more_plain: dict[str, list[float]] = {name: [] for name in more}
        chain = {k: [] for k in ks}
        trees = {k: [] for k in ks}
        heads: dict[int, list[float]] = {k: [] for k in ks}
        peer_chain = {k: [] for k in ks}
        for _ in range(reps):
            for k in ks:
                chain[k].append(ours.verify(k, False))
                h = ours.head(k)
                if h is not None:
                    heads[k].append(h)
                if tree and k > 1:
                    trees[k].append(ours.verify(k, True))
                for name, o in more.items():
                    more_chain[name][k].append(o.verify(k, False))
                    if tree and k > 1:
                        more_tree[name][k].append(o.verify(k, True))
                if peer:
                    peer_chain[k].append(peer.verify(k))
        plain, peer_plain = [], []
        for _ in range(max(3, reps // 2)):  # interleaved, so machine noise hits both alike
            plain.append(ours.plain(decode_tokens))
            for name, o in more.items():
                more_plain[name].append(o.plain(decode_tokens))
            if peer:
                peer_plain.append(peer.plain(decode_tokens))
    out: dict[str, Any] = {
        "verify": {k: statistics.median(v) for k, v in chain.items()},
        "verify_ms": {k: round(_median_ms(v), 3) for k, v in chain.items()},
        "plain_tok_s": 1.0 / statistics.median(plain),
        "context_len": context_len, "reps": reps, "threads": torch.get_num_threads() if threads is None else threads,
    }
    if all(heads.values()):
        out["head_ms"] = {k: round(_median_ms(v), 3) for k, v in heads.items()}
    if tree:
        out["tree"] = {k: statistics.median(trees[k]) if k > 1 else out["verify"][1] for k in ks}
        out["tree_ms"] = {k: round(v * 1e3, 3) for k, v in out["tree"].items()}
    if more:
        out["backends"] = {name: {"verify_ms": {k: round(_median_ms(v), 3) for k, v in more_chain[name].items()},
                                  "tree_ms": {k: round(_median_ms(more_tree[name][k]), 3) if k > 1 else
                                              round(_median_ms(more_chain[name][k]), 3) for k in ks} if tree else {},
                                  "plain_tok_s": 1.0 / statistics.median(more_plain[name])} for name in more}
    if peer:
        out["llama_cpp"] = {"verify": {k: statistics.median(v) for k, v in peer_chain.items()},
                            "verify_ms": {k: round(_median_ms(v), 3) for k, v in peer_chain.items()},
                            "plain_tok_s": 1.0 / statistics.median(peer_plain)}
    return out


class LlamaCppCosts:
    """llama-cpp-python on a GGUF file, timed like ``_OursTimer`` (raises ``ImportError`` without llama_cpp)."""

    def __init__(self, gguf_path: str | Path, context_len: int, threads: int, n_ctx: int = 1024):
        from llama_cpp import Llama  # ImportError when not installed

        self.llm = Llama(str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, logits_all=True, flash_attn=True, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.context = _context_ids(context_len, self.vocab)
        self.llm.eval(self.context)

    def verify(self, k: int) -> float:
        """One ``eval`` of k tokens after the context (``eval`` first drops the KV rows past ``n_tokens``)."""
        self.llm.n_tokens = len(self.context)
        toks = _context_ids(k + 3, self.vocab)[3:]
        t = time.perf_counter()
        self.llm.eval(toks)  # copies the logits of all k rows (logits_all)
        return time.perf_counter() - t

    def close(self) -> None:
        """Free the model and its context (idempotent)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def plain(self, n: int) -> float:
        import numpy as np

        self.llm.n_tokens = len(self.context)
        tok = self.context[-1]
        t = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return (time.perf_counter() - t) / n


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _table(res: dict, title: str) -> Any:
    from rich.table import Table

    peer = res.get("llama_cpp")
    t = Table(title=title)
    t.add_column("k", justify="right")
    t.add_column("ours chain ms", justify="right")
    t.add_column("ours tree ms", justify="right")
    t.add_column("ours c(k)/c(1)", justify="right")
    if "head_ms" in res:
        t.add_column("ours LM head ms", justify="right")
    for name in res.get("backends", {}):
        t.add_column(f"{name} chain ms", justify="right")
        t.add_column(f"{name} tree ms", justify="right")
    if peer:
        t.add_column("llama.cpp ms", justify="right")
        t.add_column("llama.cpp c(k)/c(1)", justify="right")
    c1 = res["verify_ms"][min(res["verify_ms"])]
    p1 = peer["verify_ms"][min(peer["verify_ms"])] if peer else None
    for k, ms in res["verify_ms"].items():
        row = [str(k), f"{ms:.1f}", f"{res['tree_ms'][k]:.1f}" if "tree_ms" in res else "-", f"{ms / c1:.2f}"]
        if "head_ms" in res:
            row.append(f"{res['head_ms'][k]:.2f}")
        for r in res.get("backends", {}).values():
            row += [f"{r['verify_ms'][k]:.1f}", f"{r['tree_ms'][k]:.1f}" if r["tree_ms"] else "-"]
        if peer:
            pm = peer["verify_ms"][k]
            row += [f"{pm:.1f}", f"{pm / p1:.2f}"]
        t.add_row(*row)
    return t


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaspec.bench.cost_curve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: the bundled SmolLM2)")
    ap.add_argument("--precision", default="auto", help="auto, q8, gguf, fp32, int4, bf16, fp16 (default auto)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "llamacpp", "both"],
                    help="target backend; both = torch and llamacpp timed in the same loop (default auto)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both backends (default 2)")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="comma-separated token counts")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context", type=int, default=100, help="committed context before each forward")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens per plain-decoding timing")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp column")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from rich.console import Console

    from ..files import resolve_model
    from ..model.loader import ModelLoadError, bundled_gguf_path, load_target

    console = Console()
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
        backend = "torch" if args.backend == "both" else args.backend
        model, tok = load_target(args.model, device=args.device, precision=args.precision, backend=backend,
                                 threads=args.threads)
        others = {}
        if args.backend == "both":
            others["adaspec on llama.cpp"] = load_target(args.model, backend="llamacpp", threads=args.threads)[0]
        gguf = resolve_model(args.model) if args.model else bundled_gguf_path()
    except (ValueError, ModelLoadError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    peer, peer_note = None, None
    if args.no_llama_cpp:
        peer_note = "skipped (--no-llama-cpp)"
    elif gguf.suffix.lower() != ".gguf":
        peer_note = "skipped: the model is not a GGUF file"
    else:
        try:
            peer = LlamaCppCosts(gguf, args.context, args.threads)
        except ImportError:
            peer_note = "skipped: llama_cpp is not importable (pip install llama-cpp-python)"
    if peer_note:
        console.print(f"llama.cpp column {peer_note}")
    load_before = os.getloadavg()
    res = measure_costs(model, ks, args.reps, args.context, decode_tokens=args.decode_tokens,
                        threads=args.threads, peer=peer, others=others)
    res.update({"model": tok.name, "backend": model.backend, "precision": getattr(model, "precision", "gguf"), "device": str(model.device), "cpu": _cpu_name(),
                "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                "llama_cpp_note": peer_note})
    console.print(_table(res, f"c(k) after {args.context} tokens, {args.threads} threads, {model.backend} "
                              f"backend, {res['precision']}, "
                              f"median of {args.reps} (load avg {load_before[0]:.1f})"))
    line = f"plain decoding: ours ({model.backend}) {res['plain_tok_s']:.1f} tok/s"
    for name, r in res.get("backends", {}).items():
        line += f", {name} {r['plain_tok_s']:.1f} tok/s"
    if peer:
        line += f", llama.cpp {res['llama_cpp']['plain_tok_s']:.1f} tok/s"
    console.print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
