"""A target backend over llama.cpp (llama-cpp-python's C API): every architecture llama.cpp runs, from its GGUF.

One ``llama_context`` serves every sequence of the model in llama.cpp's unified KV memory; a chain or a token tree
is one ``llama_decode`` and ``commit`` keeps the accepted path (how, on :class:`LlamaCppModel`). Outputs equal
llama.cpp's own plain decoding up to its batch noise (README, "Guarantees"); the torch backend is the bit-exact one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import Capabilities, ForwardOutput, KVCacheFull
from .tokenizer import END_OF_TURN_TOKENS, Tokenizer

log = logging.getLogger(__name__)

__all__ = ["LlamaCppModel", "LlamaCppCache", "GGUFTokenizer", "LlamaCppError", "gguf_architecture"]

MAX_SEQUENCES = 256  # llama.cpp's limit on sequence ids per context (LLAMA_MAX_SEQ)
DEFAULT_CELLS = 8192  # KV cells shared by all sequences of one model


class LlamaCppError(ValueError):
    """llama.cpp cannot load the file or run the request."""


class LlamaCppCacheFull(LlamaCppError, KVCacheFull):
    """llama.cpp's KV cells are all taken by the sequences in flight."""


def _lib():
    import llama_cpp

    # llama-cpp-python routes llama.cpp's log through this logger; keep its INFO chatter off stderr
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file (read from its header only)."""
    from .gguf_header import GGUFHeaderError, read_header

    try:
        return read_header(path).architecture
    except GGUFHeaderError as e:
        raise LlamaCppError(str(e)) from None


@dataclass(frozen=True)
class GGUFShape:
    """Dimensions of the loaded model, as llama.cpp reports them."""

    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int  # trained context


class LlamaCppModel:
    """``TargetModel`` over llama.cpp. ``threads``: llama.cpp's threads (default: the cores this process may use).

    ``cells``: KV cells shared by all live sequences (prompt + output of every request in flight, plus drafts).
    ``max_context``: the longest single sequence, at most the trained context and ``cells``.

    One ``llama_context`` serves every sequence of the model. Its KV memory is
    unified: a cell holds one position's keys and values and the set of sequence ids
    that see it, so a token shared by several sequences is computed and stored once.

    * Each ``LlamaCppCache`` owns a *home* sequence id; its committed positions are
      the cells of that sequence.
    * A chain of k tokens is one ``llama_decode`` of k rows in the home sequence;
      ``commit(keep)`` removes the cells past the accepted prefix.
    * A token tree is one ``llama_decode`` too. Every leaf gets a sequence (the
      first leaf the home sequence, the others scratch ids that first share the
      committed prefix), and each tree token is put in the sequences of every leaf
      below it, so it attends to the committed cache and its own ancestors only::

            root(0) ─ a(1) ─ b(2)          leaf b: sequences {home}
                   └─ c(3)                 leaf c: sequences {s1}
            rows: 0 -> {home, s1}, 1 -> {home}, 2 -> {home}, 3 -> {s1}

      ``commit(keep)`` makes the home sequence hold exactly the accepted path (it
      is a prefix of some leaf's path, whose sequence has exactly those cells) and
      drops the scratch sequences, which frees every rejected cell.
    * ``forward_batch`` runs the forwards of several caches (chains or trees) as
      one ``llama_decode``, each in its own sequences as above; ``forward`` is a
      batch of one.

    Numerics: with flash attention on (llama.cpp's CPU default, set here) a verified row equals the same position
    decoded alone bit for bit while the sequence is short; past that the one-row attention takes another path
    and rows differ by rounding (README, "Guarantees", gives the figures). Some weight types also
    get batch-size-dependent matmul kernels. So speculative greedy output equals plain greedy output of this
    backend except at near-ties (measured in tests/test_llamacpp.py). Rejected tree cells below accepted ones are
    parked in a per-cache sequence until the cache is dropped: a later token would otherwise fill the hole and sit
    before older positions, changing the order the attention sums in. The torch backend is the bit-exact one.
    """

    capabilities = Capabilities(trees=True, hidden_states=True, rows_exact=False)
    device = torch.device("cpu")
    backend = "llamacpp"
    backend_reason = ""  # why the loader chose this backend

    def __init__(self, path: str | os.PathLike, threads: int | None = None, cells: int = DEFAULT_CELLS,
                 max_context: int | None = None, batch: int = 512):
        if batch < MAX_SEQUENCES:  # llama.cpp reserves an output row per sequence id and aborts the process
            raise LlamaCppError(f"a batch of {batch} rows is below llama.cpp's {MAX_SEQUENCES} sequences")
        L = _lib()
        self._L = L
        self.path = Path(path)
        self.threads = int(threads or len(os.sched_getaffinity(0)))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self._model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise LlamaCppError(f"llama.cpp cannot load {str(self.path)!r} (not a GGUF it supports; "
                                f"architecture {self._arch_or_unknown()!r})")
        self._vocab = L.llama_model_get_vocab(self._model)
        arch = self.meta("general.architecture") or "unknown"
        self.cfg = GGUFShape(arch, int(L.llama_model_n_layer(self._model)), int(L.llama_model_n_embd(self._model)),
                             int(L.llama_vocab_n_tokens(self._vocab)), int(L.llama_model_n_ctx_train(self._model)))
        self.vocab_size = self.cfg.vocab_size
        self.hidden_size = self.cfg.hidden_size
        cp = L.llama_context_default_params()
        cp.n_ctx = int(cells)
        cp.n_batch = cp.n_ubatch = int(batch)
        cp.n_seq_max = MAX_SEQUENCES
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.embeddings = False  # switched on per decode when hidden states are wanted
        cp.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        cp.kv_unified = True
        cp.no_perf = True
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED  # faster on CPU, and row exact on short contexts
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            L.llama_model_free(self._model)
            raise LlamaCppError(f"llama.cpp cannot create a context for {str(self.path)!r} with {cells} cells")
        self._mem = L.llama_get_memory(self._ctx)
        self.cells = int(L.llama_n_ctx(self._ctx))
        self.max_context = min(self.cfg.context_length, self.cells, int(max_context or self.cells))
        self._batch_size = int(batch)
        self._batch = L.llama_batch_init(self._batch_size, 0, MAX_SEQUENCES)
        self._free = list(range(MAX_SEQUENCES - 1, -1, -1))  # sequence ids not in use (pop from the end)
        self._released: list[int] = []  # home ids of dropped caches, freed on the decode thread
        self._embeddings_on = False
        self._park_limit = max(64, self.cells // 32)  # parked cells per sequence before holes are simply freed
        self.want_hidden = True  # hidden states in every output (a draft head needs them); False saves the copy
        self._finalizer = weakref.finalize(self, _free_native, L, self._model, self._ctx, self._batch)
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode a few tokens once, so the first request does not pay llama.cpp's graph setup."""
        seq = self._free.pop()
        try:
            for n in (1, 8):
                self._decode([0] * n, list(range(n)), [(seq,)] * n, [True] * n, hidden=self.want_hidden)
                self._L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        finally:
            self._free.append(seq)

    def _arch_or_unknown(self) -> str:
        try:
            return gguf_architecture(self.path)
        except LlamaCppError:
            return "unknown"

    def close(self) -> None:
        self._finalizer()

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (None when absent)."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # long values (chat templates) need a bigger buffer
            buf = ctypes.create_string_buffer(n + 1)
            self._L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    # -- weights a draft head shares ---------------------------------------------------------------

    @cached_property
    def _dense(self) -> dict[str, torch.Tensor]:
        """The token embedding (and an untied output matrix) dequantised to fp32 from the file."""
        from gguf import GGUFReader
        from gguf.quants import dequantize

        out = {}
        for t in GGUFReader(str(self.path)).tensors:
            if t.name in ("token_embd.weight", "output.weight"):
                out[t.name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        return out

    @property
    def embed(self) -> torch.Tensor:
        """[vocab, d] fp32 token embedding (the input embedding before any architecture-specific scaling)."""
        return self._dense["token_embd.weight"]

    @property
    def lm_head(self):
        w = self._dense.get("output.weight")
        return None if w is None else _Dense(w)

    # -- sequences -----------------------------------------------------------------------------------

    def new_cache(self) -> "LlamaCppCache":
        self._reclaim()
        if not self._free:
            raise LlamaCppError(f"all {MAX_SEQUENCES} llama.cpp sequences are in use")
        cache = LlamaCppCache(self, self._free.pop())
        weakref.finalize(cache, self._released.extend, cache._ids)
        return cache

    def _reclaim(self) -> None:
        """Free the sequences of caches that were dropped (their finalizers only queue the id)."""
        while self._released:
            seq = self._released.pop()
            self._L.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._free.append(seq)

    def _take(self, n: int) -> list[int]:
        if len(self._free) < n:
            raise LlamaCppError(f"a draft tree needs {n} more sequences than llama.cpp has free")
        return [self._free.pop() for _ in range(n)]

    # -- forwards ------------------------------------------------------------------------------------

    def prefill(self, cache: "LlamaCppCache", tokens: Sequence[int]) -> ForwardOutput:
        self._reclaim()
        cache._drop_pending()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self._check_room(cache, len(tokens))
        start, home = cache.length, cache.seq
        body, last = tokens[:-1], tokens[-1]
        for lo in range(0, len(body), self._batch_size):  # no outputs, no hidden states: only the KV cells
            chunk = body[lo:lo + self._batch_size]
            self._decode(chunk, [start + lo + i for i in range(len(chunk))], [(home,)] * len(chunk),
                         [False] * len(chunk), hidden=False)
        out = self._decode([last], [start + len(body)], [(home,)], [True], hidden=self.want_hidden)
        cache._length += len(tokens)
        return out

    def forward(self, cache: "LlamaCppCache", tokens: Sequence[int],
                parents: Sequence[int] | None = None) -> ForwardOutput:
        return self.forward_batch([(cache, tokens, parents)])[0]

    def forward_batch(self, items: Sequence[tuple["LlamaCppCache", Sequence[int], Sequence[int] | None]]
                      ) -> list[ForwardOutput]:
        """One target forward over several sequences: item i is ``(cache, tokens, parents)`` exactly as ``forward``
        takes them, and output i is what ``forward(cache, tokens, parents)`` returns for it (logits
        [len(tokens), vocab], hidden or None). Every cache is left with its own uncommitted forward, committed (or
        dropped) per cache as after ``forward``. The caches must be distinct (ValueError otherwise).

        All items are one ``llama_decode``: each item's rows go to its own sequences (its home sequence and, for a
        tree, scratch sequences taken for it), which the unified KV memory keeps apart. Rows equal separate
        forwards up to llama.cpp's batch noise (its kernels depend on the rows in one decode; measured in
        tests/test_llamacpp.py). If anything fails, every sequence taken is given back and every cache is left as
        committed, with no uncommitted forward.
        """
        items = [(cache, [int(t) for t in tokens], parents) for cache, tokens, parents in items]
        if not items:
            return []
        caches = [cache for cache, _, _ in items]
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one batch")
        if any(c._model is not self for c in caches):
            raise ValueError("a cache of another model")
        self._reclaim()
        for cache in caches:
            cache._drop_pending()
        layouts = [_layout(tokens, parents) for _, tokens, parents in items]  # checks the trees; no side effects
        total = sum(len(tokens) for _, tokens, _ in items)
        if total > self._batch_size:
            what = f"a forward of {total} tokens" if len(items) == 1 else \
                f"a batched forward of {total} tokens ({len(items)} sequences)"
            raise LlamaCppError(f"{what} exceeds llama.cpp's batch of {self._batch_size}")
        for cache, tokens, _ in items:
            self._check_room(cache, len(tokens))
        taken: list[list[int]] = []  # scratch sequences per item, in item order
        try:
            toks: list[int] = []
            pos: list[int] = []
            seqs: list[tuple[int, ...]] = []
            for (cache, tokens, _), lay in zip(items, layouts):
                L0, home = cache.length, cache.seq
                scratch = self._take(lay.leaves - 1)
                taken.append(scratch)
                for s in scratch:  # each scratch sequence first sees the committed prefix
                    self._L.llama_memory_seq_cp(self._mem, home, s, 0, L0)
                leaf_seq = [home] + scratch
                toks += tokens
                pos += [L0 + d - 1 for d in lay.depth]
                seqs += [tuple(leaf_seq[j] for j in row) for row in lay.row_leaves]
            out = self._decode(toks, pos, seqs, [True] * total, self.want_hidden)
        except BaseException:
            for scratch in taken:
                for s in scratch:
                    self._L.llama_memory_seq_rm(self._mem, s, -1, -1)
                self._free.extend(scratch)
            for cache in caches:
                self._L.llama_memory_seq_rm(self._mem, cache.seq, cache.length, -1)
            raise
        outs, at = [], 0
        for (cache, tokens, _), lay, scratch in zip(items, layouts, taken):
            n = len(tokens)
            if lay.chain:
                cache._pending = _Pending([])
            else:  # a row's cell is found as (any sequence that holds it, its position): the first of its sequences
                leaf_seq = [cache.seq] + scratch
                cache._pending = _Pending(scratch, [leaf_seq[row[0]] for row in lay.row_leaves], lay.depth)
            outs.append(ForwardOutput(out.logits[at:at + n], None if out.hidden is None else out.hidden[at:at + n]))
            at += n
        return outs

    def _check_room(self, cache: "LlamaCppCache", n: int) -> None:
        if cache.length + n > self.max_context:
            raise ValueError(f"{cache.length} + {n} tokens exceed the context of {self.max_context}")

    def _decode(self, tokens: list[int], pos: list[int], seqs: list[tuple[int, ...]], outputs: list[bool],
                hidden: bool) -> ForwardOutput:
        L, b = self._L, self._batch
        n = len(tokens)
        if hidden != self._embeddings_on:
            L.llama_set_embeddings(self._ctx, hidden)
            self._embeddings_on = hidden
        b.n_tokens = n
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = pos[i]
            s = seqs[i]
            b.n_seq_id[i] = len(s)
            row = b.seq_id[i]
            for j, x in enumerate(s):
                row[j] = x
            b.logits[i] = outputs[i]
        rc = L.llama_decode(self._ctx, b)
        if rc == 1:
            raise LlamaCppCacheFull("llama_decode failed: no free KV cells (too many tokens in flight)")
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed: error code {rc}")
        rows = sum(outputs)
        if rows == 0:
            return ForwardOutput(torch.empty(0, self.vocab_size), None)
        # one copy of the logits: llama.cpp's buffer -> a tensor the caller owns. [rows, vocab]
        logits = torch.from_numpy(np.ctypeslib.as_array(L.llama_get_logits(self._ctx),
                                                        shape=(rows, self.vocab_size)).copy())
        h = None
        if hidden:
            ptr = L.llama_get_embeddings(self._ctx)
            if ptr:
                h = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(rows, self.hidden_size)).copy())  # [rows, d]
        return ForwardOutput(logits, h)

    # -- commit / rollback -----------------------------------------------------------------------------

    def _commit(self, cache: "LlamaCppCache", keep: Sequence[int]) -> None:
        pending, cache._pending = cache._pending, None
        if pending is None:
            raise RuntimeError("commit without a forward")
        L0, home, m = cache.length, cache.seq, len(keep)
        rm, cp = self._L.llama_memory_seq_rm, self._L.llama_memory_seq_cp
        if pending.row_seq is None:  # chain: keep is a prefix
            if list(keep) != list(range(m)):
                raise ValueError(f"commit of a chain needs a prefix, got {list(keep)}")
            rm(self._mem, home, L0 + m, -1)
        else:
            if m:
                row_seq, depth = pending.row_seq, pending.depth
                # Rejected rows before the last accepted one leave holes below accepted cells; a later token
                # would fill them and sit before older positions, which changes the order llama.cpp's attention
                # sums in. Parking them keeps every sequence's cells in position order, as in plain decoding.
                kept = set(keep)
                holes = [r for r in range(keep[-1]) if r not in kept]
                if holes and cache._parked + len(holes) <= self._park_limit:
                    park = cache._park_seq()
                    for r in holes:
                        pos = L0 + depth[r] - 1
                        cp(self._mem, row_seq[r], park, pos, pos + 1)
                    cache._parked += len(holes)
                seq = row_seq[keep[-1]]
                if seq != home:
                    rm(self._mem, home, L0, -1)
                    cp(self._mem, seq, home, L0, L0 + m)
            rm(self._mem, home, L0 + m, -1)
            for s in pending.scratch:
                rm(self._mem, s, -1, -1)
            self._free.extend(pending.scratch)
        cache._length += m

    def _truncate(self, cache: "LlamaCppCache", length: int) -> None:
        cache._drop_pending()
        if not 0 <= length <= cache.length:
            raise ValueError(f"cannot truncate {cache.length} positions to {length}")
        self._L.llama_memory_seq_rm(self._mem, cache.seq, length, -1)
        cache._length = length


@dataclass
class _Pending:
    """An uncommitted forward: the scratch sequences it took and, for a tree, where each row's cell is."""

    scratch: list[int]
    row_seq: list[int] | None = None  # per row, a sequence holding its cell (every leaf below it has one)
    depth: list[int] | None = None  # per row, 1 for the root


@dataclass(frozen=True)
class _Layout:
    """Where one forward's rows go: ``leaves`` sequences (the home sequence, then scratch ones), and per row its
    depth (1 for the first row) and the leaves below it (indices into those sequences)."""

    chain: bool
    leaves: int
    depth: list[int]
    row_leaves: list[tuple[int, ...]]


def _layout(tokens: list[int], parents: Sequence[int] | None) -> _Layout:
    """A chain is one sequence; a token tree gives every leaf a sequence and puts each token in the sequences of
    every leaf below it (class docstring of :class:`LlamaCppModel`)."""
    n = len(tokens)
    if n == 0:
        raise ValueError("forward needs at least one token")
    if parents is not None and len(parents) != n:
        raise ValueError(f"{len(parents)} parents for {n} tokens")
    if parents is None or all(p == i - 1 for i, p in enumerate(parents)):
        return _Layout(True, 1, list(range(1, n + 1)), [(0,)] * n)
    parents = [int(p) for p in parents]
    depth = [0] * n
    has_child = [False] * n
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: a parent must come before its child")
        depth[i] = 1 if p < 0 else depth[p] + 1
        if p >= 0:
            has_child[p] = True
    if sum(p < 0 for p in parents) != 1 or parents[0] != -1:
        raise ValueError("a tree forward needs exactly one root, at index 0")
    leaves = [i for i in range(n) if not has_child[i]]
    row_leaves: list[list[int]] = [[] for _ in range(n)]
    for j, leaf in enumerate(leaves):
        i = leaf
        while i >= 0:
            row_leaves[i].append(j)
            i = parents[i]
    return _Layout(False, len(leaves), depth, [tuple(r) for r in row_leaves])


@dataclass(frozen=True)
class _Dense:
    weight: torch.Tensor


def _free_native(L, model, ctx, batch) -> None:
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


class LlamaCppCache:
    """One sequence of a ``LlamaCppModel``: committed positions are the cells of sequence ``seq``."""

    def __init__(self, model: LlamaCppModel, seq: int):
        self._model = model
        self.seq = seq
        self._length = 0
        self._pending: _Pending | None = None
        self._ids = [seq]  # sequence ids this cache owns (home, then the parking sequence if any)
        self._parked = 0  # cells held by the parking sequence

    def _park_seq(self) -> int:
        if len(self._ids) == 1:
            self._ids += self._model._take(1)
        return self._ids[1]

    @property
    def length(self) -> int:
        return self._length

    def commit(self, keep: Sequence[int]) -> None:
        self._model._commit(self, [int(k) for k in keep])

    def truncate(self, length: int) -> None:
        self._model._truncate(self, length)

    def _drop_pending(self) -> None:
        """Undo an uncommitted forward (its rows are not part of the sequence)."""
        if self._pending is not None:
            self._model._commit(self, [])


class GGUFTokenizer(Tokenizer):
    """The tokenizer llama.cpp builds from the GGUF's own vocabulary, with the file's chat template."""

    def __init__(self, model: LlamaCppModel, name: str | None = None):
        self._m = model
        self._L = model._L
        self._vocab = model._vocab
        self.hf = None
        self.name = name or model.path.stem
        self.chat_template = model.meta("tokenizer.chat_template")
        L, v = self._L, self._vocab
        ids = {int(t) for t in (L.llama_vocab_eos(v), L.llama_vocab_eot(v)) if t >= 0}
        for text in END_OF_TURN_TOKENS:
            t = self._special_id(text)
            if t is not None:
                ids.add(t)
        self.eos_token_ids = {t for t in ids if L.llama_vocab_is_eog(v, t)} or ids

    def _special_id(self, text: str) -> int | None:
        ids = self._tokenize(text, add_special=False)
        return ids[0] if len(ids) == 1 and self._piece(ids[0], special=True) == text.encode() and \
            not self._piece(ids[0], special=False) else None

    @property
    def vocab_size(self) -> int:
        return self._m.vocab_size

    def _token_text(self, tid: int) -> str | None:
        return None if tid < 0 else self._piece(tid, special=True).decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self._L.llama_vocab_bos(self._vocab))

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self._L.llama_vocab_eos(self._vocab))

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8", errors="strict")
        cap = len(data) + 16
        buf = (self._L.llama_token * cap)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (self._L.llama_token * cap)()
            n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:
            raise ValueError("llama.cpp could not tokenize the text")
        return list(buf[:n])

    def _piece(self, tid: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self._vocab, tid, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self._vocab, tid, buf, len(buf), 0, special)
        return buf.raw[:n]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        try:
            return self._tokenize(text, add_special_tokens)
        except UnicodeEncodeError as e:
            raise ValueError(f"text cannot be encoded as UTF-8: {e}") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        n = self.vocab_size
        data = b"".join(self._piece(int(i), not skip_special_tokens) for i in ids if 0 <= int(i) < n)
        return data.decode("utf-8", errors="replace")
