"""Projection kernels: how ``x [n, in] -> x @ W.T [n, out]`` is computed for the target.

Every kernel here is *row independent* (row i of the output depends on row i of the input only, bit for bit), so
verifying k draft tokens in one forward gives each row exactly what a one-token forward would give: that is what
keeps speculation lossless. The schemes (``gguf``, ``fp32``, ``int4``, ``bf16``/``fp16``) are on :func:`make_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Precision = Literal["q8", "gguf", "fp32", "int4", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("q8", "gguf", "fp32", "int4", "bf16", "fp16")
GROUP = 32  # weights per quantisation group (GGUF blocks and the int4 kernel alike)

BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
"""GGUF block types :class:`GGUFBlocks` reads: (weights per block, bytes per block)."""
_BLOCK_BYTES = {kind: size for kind, (_, size) in BLOCK_LAYOUT.items()}
INT4_KINDS = ("Q4_0", "Q4_1")


class Linear(Protocol):
    """A projection: ``x [n, in] -> [n, out]`` (output dtype is the kernel's; callers promote)."""

    in_features: int
    out_features: int
    weight: torch.Tensor | None  # the dense weight it was built from, when kept (tied heads share it)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ...


# ---------------------------------------------------------------------------------------------
# GGUF blocks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFBlocks:
    """The raw quantised rows of one GGUF weight, in Hugging Face row order.

    ``data`` is ``[out, in / block_weights * block_bytes]`` uint8: each row is a
    run of blocks (``BLOCK_LAYOUT``). Blocks of 32 weights: ``Q4_0``: fp16 ``d``
    then 16 bytes of nibbles, ``w = d * (q - 8)``. ``Q4_1``: fp16 ``d``, fp16
    ``m``, 16 bytes of nibbles, ``w = d * q + m``. ``Q8_0``: fp16 ``d`` then 32
    int8, ``w = d * q``. ``Q5_0``/``Q5_1``: as ``Q4_0``/``Q4_1`` with a fifth bit
    per weight (4 bytes after the fp16 fields), ``q`` in 0..31 and
    ``w = d * (q - 16)`` / ``w = d * q + m``. In the nibble bytes, byte j holds
    weight j in its low nibble and weight j + 16 in its high nibble.

    K-quants, super-blocks of 256 weights: ``Q4_K``/``Q5_K``: fp16 ``d``, fp16
    ``dmin``, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, (``Q5_K``:
    32 bytes of fifth bits,) 128 bytes of nibbles; ``w = d * sc_j * q - dmin * m_j``.
    ``Q6_K``: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8
    scales for sub-blocks of 16, fp16 ``d``; ``w = d * sc_j * (q - 32)``. These are
    dequantised by the ``gguf`` package's reference code (llama.cpp's arithmetic
    in fp32).
    """

    kind: str
    data: torch.Tensor  # [out, blocks * block_bytes] uint8

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_LAYOUT:
            raise ValueError(f"unsupported GGUF block type {self.kind}")
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] % _BLOCK_BYTES[self.kind]:
            raise ValueError(f"{self.kind} data must be a [rows, k * {_BLOCK_BYTES[self.kind]}] uint8 tensor")

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight."""
        weights, size = BLOCK_LAYOUT[self.kind]
        return self.data.shape[0], self.data.shape[1] // size * weights

    def _blocks(self) -> torch.Tensor:
        return self.data.reshape(self.data.shape[0], -1, _BLOCK_BYTES[self.kind])  # [out, groups, bytes]

    def _half(self, b: torch.Tensor, at: int) -> torch.Tensor:
        return b[..., at : at + 2].contiguous().view(torch.float16).squeeze(-1).float()  # [out, groups]

    def int4_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [out, in]`` in 0..15 (uint8), ``scale`` and ``zero`` ``[out, groups]`` fp32: ``w = (q - 8) * scale + zero``."""
        if self.kind not in INT4_KINDS:
            raise ValueError(f"{self.kind} is not a 4-bit block type")
        b = self._blocks()
        d = self._half(b, 0)
        nib = (b[..., 2:] if self.kind == "Q4_0" else b[..., 4:]).numpy()  # [out, groups, 16]
        q = np.empty(nib.shape[:2] + (GROUP,), dtype=np.uint8)  # numpy: torch's uint8 cat/shift are slow here
        np.bitwise_and(nib, 0xF, out=q[..., :16])
        np.right_shift(nib, 4, out=q[..., 16:])
        q = torch.from_numpy(q).reshape(b.shape[0], -1)  # [out, in]
        zero = torch.zeros_like(d) if self.kind == "Q4_0" else self._half(b, 2) + 8 * d
        return q, d, zero

    def dequantize(self) -> torch.Tensor:
        """The exact fp32 weights ``[out, in]`` (every GGUF value here is exact in fp32)."""
        if self.kind == "Q8_0":
            b = self._blocks()
            q = b[..., 2:].contiguous().view(torch.int8).float()  # [out, groups, 32]
            return (q * self._half(b, 0)[..., None]).reshape(b.shape[0], -1)
        if self.kind in INT4_KINDS:
            q, scale, zero = self.int4_parts()
            return dequantize_int4(q, scale, zero)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.data.contiguous().numpy(), GGMLQuantizationType[self.kind])  # [out, in] float32
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def rows(self, index: torch.Tensor) -> "GGUFBlocks":
        """The same weight with its rows reordered (quantisation blocks run along rows, so this is exact)."""
        return GGUFBlocks(self.kind, self.data[index])

    @staticmethod
    def quantize(w: torch.Tensor, kind: str) -> "GGUFBlocks":
        """Blocks of ``kind`` for dense weights ``w [out, in]`` (lossy), for tests and random models: the ``gguf``
        package's reference quantisers (llama.cpp's recipes) for blocks of 32, plain min/max recipes for the
        K-quants, which it lacks (valid blocks, not llama.cpp's error-minimising search)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        if kind not in BLOCK_LAYOUT:
            raise ValueError(f"unsupported GGUF block type {kind}")
        weights = BLOCK_LAYOUT[kind][0]
        if w.dim() != 2 or w.shape[1] % weights:
            raise ValueError(f"{kind} blocks need a [out, in] weight with in a multiple of {weights}")
        x = w.detach().float().cpu().numpy()
        data = _K_QUANTIZERS[kind](x) if kind in _K_QUANTIZERS else quantize(x, GGMLQuantizationType[kind])
        return GGUFBlocks(kind, torch.from_numpy(np.ascontiguousarray(data)))

    @staticmethod
    def cat(parts: Sequence["GGUFBlocks"]) -> "GGUFBlocks":
        """Stack weights along the output dimension (all of one kind)."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse GGUF weights of different types {sorted(kinds)}")
        return GGUFBlocks(kinds.pop(), torch.cat([p.data for p in parts]))


def _fp16(x: np.ndarray) -> np.ndarray:
    """fp16 values as [..., 2] bytes, and the fp32 values they stand for (what dequantisation reads)."""
    h = x.astype(np.float16)
    return h[..., None].view(np.uint8), h.astype(np.float32)


def _codes(x: np.ndarray, step: np.ndarray, offset: np.ndarray, top: int) -> np.ndarray:
    """``round((x + offset) / step)`` clamped to 0..top (0 where the step is 0), as uint8."""
    safe = np.where(step > 0, step, 1.0)
    return np.clip(np.rint((x + offset) / safe) * (step > 0), 0, top).astype(np.uint8)


def _quantize_k_scaled(x: np.ndarray, bits: int) -> np.ndarray:
    """``Q4_K`` (``bits`` 4) or ``Q5_K`` (5) blocks for ``x [out, in]``: per sub-block of 32 a min/max affine code
    ``w = d * sc * q - dmin * m``, its 6-bit ``sc`` and ``m`` relative to the super-block's ``d`` and ``dmin``."""
    out = x.shape[0]
    g = x.reshape(-1, 8, 32)  # [blocks, sub-blocks, 32]
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)  # [blocks, 8]
    top = (1 << bits) - 1
    d_bytes, d = _fp16((hi - lo).max(-1) / top / 63)  # [blocks, 2], [blocks]
    m_bytes, dmin = _fp16(-lo.min(-1) / 63)
    sc = _codes((hi - lo) / top, d[:, None], 0, 63)  # [blocks, 8]
    m = _codes(-lo, dmin[:, None], 0, 63)
    q = _codes(g, (d[:, None] * sc)[..., None], (dmin[:, None] * m)[..., None], top)  # [blocks, 8, 32]
    scales = np.empty((g.shape[0], 12), np.uint8)  # see gguf's Q4_K.get_scale_min for the packing
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # sub-blocks 2c and 2c + 1 share the 32 bytes of chunk c
    nibbles = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    fields = [d_bytes, m_bytes, scales]
    if bits == 5:  # byte l holds the fifth bit of weight l of sub-block j in its bit j
        fields.append(((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8))
    return np.concatenate([*fields, nibbles], axis=1).reshape(out, -1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """``Q6_K`` blocks for ``x [out, in]``: per sub-block of 16 a symmetric 6-bit code ``w = d * sc * (q - 32)``,
    its int8 ``sc`` relative to the super-block's ``d``."""
    out = x.shape[0]
    g = x.reshape(-1, 16, 16)  # [blocks, sub-blocks, 16]
    step = np.abs(g).max(-1) / 31  # [blocks, 16]
    d_bytes, d = _fp16(step.max(-1) / 127)
    sc = _codes(step, d[:, None], 0, 127)
    u = _codes(g, (d[:, None] * sc)[..., None], 32 * (d[:, None] * sc)[..., None], 63).reshape(-1, 2, 4, 32)
    # per half of 128: u[k] holds weights 32 k .. 32 k + 31; ql byte l (l < 64) holds weight l (low nibble) and
    # l + 64 (high nibble); qh byte l (l < 32) holds the top two bits of weights l, l + 32, l + 64, l + 96
    low = u & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = ((u >> 4) << np.array([0, 2, 4, 6], np.uint8)[:, None]).sum(2, dtype=np.uint8)  # [blocks, 2, 32]
    fields = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), d_bytes]
    return np.concatenate(fields, axis=1).reshape(out, -1)


_K_QUANTIZERS = {"Q4_K": lambda x: _quantize_k_scaled(x, 4), "Q5_K": lambda x: _quantize_k_scaled(x, 5),
                 "Q6_K": _quantize_q6_k}


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``w = (q - 8) * scale + zero`` with per-group ``scale``/``zero`` ``[out, in / 32]`` -> fp32 ``[out, in]``."""
    s = scale.float().repeat_interleave(GROUP, dim=1)
    z = zero.float().repeat_interleave(GROUP, dim=1)
    return (q.float() - 8) * s + z


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max (asymmetric) 4-bit quantisation per group of 32 inputs, the ``Q4_1`` recipe.

    Returns ``q [out, in]`` uint8 in 0..15 and ``scale``, ``zero`` ``[out, in / 32]``
    with ``w ~ (q - 8) * scale + zero``. Lossy: used for ``int4`` on non-GGUF weights.
    """
    out, n_in = w.shape
    if n_in % GROUP:
        raise ValueError(f"int4 needs the input dimension to be a multiple of {GROUP}, got {n_in}")
    g = w.float().reshape(out, n_in // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)  # [out, groups]
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8).reshape(out, n_in)
    return q, scale, lo + 8 * scale


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


class DenseLinear:
    """``F.linear`` with the weight in its own dtype; inputs are cast to it."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()  # [out, in]
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


def _onednn_usable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class OneDnnLinear:
    """fp32 matmul through oneDNN with a prepacked weight (CPU); plain ``F.linear`` elsewhere.

    ``keep_weight`` keeps the unpacked weight as ``weight`` (a tied LM head shares
    the embedding tensor); otherwise only the packed copy stays in memory.
    """

    def __init__(self, weight: torch.Tensor, keep_weight: bool = False):
        self.out_features, self.in_features = weight.shape
        self._packed: torch.Tensor | None = None
        if _onednn_usable(weight):
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
            except (RuntimeError, AttributeError):  # a build without the op: stay on F.linear
                self._packed = None
        self.weight = weight if keep_weight or self._packed is None else None  # [out, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return F.linear(x.to(self.weight.dtype), self.weight)
        return torch.ops.mkldnn._linear_pointwise(x.float().contiguous(), self._packed, None, "none", [], "")


def int4_kernel_available(out_features: int, in_features: int, device: torch.device | str = "cpu") -> bool:
    """Whether the CPU tinygemm int4 kernel takes this shape (else ``Int4Linear`` emulates it densely)."""
    return (torch.device(device).type == "cpu" and out_features % 16 == 0 and in_features % GROUP == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


class Int4Linear:
    """Group-32 int4 weights, bf16 activations, fp32 accumulation, bf16 outputs (see the module docstring).

    Where the kernel is unavailable (shape, device) the same function is
    computed densely: bf16-rounded inputs times the dequantised weight with
    bf16-rounded scales, rounded to bf16. ``bulk`` computes that dense form
    through oneDNN for many rows at once (prefill), where the int4 kernel is
    about half as fast; its fp32 weight is built on first use. It equals
    ``__call__`` up to the order of fp32 additions, i.e. the bf16 output can
    differ by one unit in the last place, so only prefill uses it: verification
    forwards must give each row exactly what a one-row forward gives.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device: torch.device | str = "cpu"):
        out, n_in = q.shape
        if scale.shape != (out, n_in // GROUP) or zero.shape != scale.shape:
            raise ValueError("scale and zero must be [out, in / 32]")
        self.out_features, self.in_features = out, n_in
        self.weight = None
        self._q = q.to(torch.uint8)  # [out, in] in 0..15, kept to build the dense form
        self._scale, self._zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)  # [out, groups]
        self._dense: OneDnnLinear | None = None
        self._packed = None
        if int4_kernel_available(out, n_in, device):
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._q.to(torch.int32), 1)
            self._scale_zero = torch.stack([self._scale.T, self._zero.T], dim=-1).contiguous()  # [groups, out, 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return self.bulk(x)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self._packed, GROUP, self._scale_zero)

    def bulk(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            self._dense = OneDnnLinear(dequantize_int4(self._q, self._scale, self._zero))
        return self._dense(x.to(torch.bfloat16).float()).to(torch.bfloat16)


class QLinear:
    """GGUF blocks through adaspec's compiled kernels (``adaspec/kernels``): fp32 activations (``qmm.cpp``, the
    ``gguf`` precision) or int8 activations quantised row by row (``qmm8.cpp``, the ``q8`` precision).

    ``blocks`` is one weight or several stacked along the outputs (a fused projection whose parts a GGUF file
    stores in different block types); each part runs as its own product into its columns of the output. Row
    independent by construction, for every number of rows. The ``gguf`` precision uses the blocks as stored;
    ``q8`` rearranges them once (the same bytes, 8 output rows interleaved) for its kernels.
    """

    def __init__(self, blocks: "GGUFBlocks | Sequence[GGUFBlocks]", int8: bool = False):
        from .. import kernels

        parts = _merge_runs([blocks] if isinstance(blocks, GGUFBlocks) else list(blocks))
        allowed = kernels.KINDS if int8 else kernels.FP32_KINDS
        for p in parts:
            if p.kind not in allowed:
                raise ValueError(f"the adaspec kernels do not compute {p.kind} blocks with "
                                 f"{'int8' if int8 else 'fp32'} activations")
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("stacked weights must share their input size")
        self.int8 = int8
        self.kind = parts[0].kind if len(parts) == 1 else "+".join(p.kind for p in parts)
        self.out_features, self.in_features = sum(p.shape[0] for p in parts), parts[0].shape[1]
        self.weight = None
        # (block kind code, the data the kernel reads, output rows) per part
        self.parts = [(kernels.KINDS[p.kind], kernels.pack8(p.data.contiguous(), p.kind) if int8 else
                       p.data.contiguous(), p.shape[0]) for p in parts]
        self._op = torch.ops.adaspec_kernels.qmm8 if int8 else torch.ops.adaspec_kernels.qmm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        outs = [self._op(x, data, code, rows) if self.int8 else self._op(x, data, code)
                for code, data, rows in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _merge_runs(parts: list["GGUFBlocks"]) -> list["GGUFBlocks"]:
    """Consecutive parts of one block type joined into one (fewer, larger products)."""
    out: list[GGUFBlocks] = []
    for p in parts:
        if out and out[-1].kind == p.kind:
            out[-1] = GGUFBlocks.cat([out[-1], p])
        else:
            out.append(p)
    return out


def kernels_take(blocks: "GGUFBlocks | Sequence[GGUFBlocks] | None", precision: str,
                 device: torch.device | str = "cpu") -> bool:
    """Whether ``precision`` (``gguf`` or ``q8``) runs these blocks through the compiled kernels (else the weight
    stays dense fp32)."""
    from .. import kernels

    if blocks is None or torch.device(device).type != "cpu" or precision not in ("gguf", "q8"):
        return False
    parts = [blocks] if isinstance(blocks, GGUFBlocks) else list(blocks)
    allowed = kernels.KINDS if precision == "q8" else kernels.FP32_KINDS
    return bool(parts) and all(p.kind in allowed for p in parts) and kernels.available()


def make_linear(precision: str, weight: torch.Tensor | None = None,
                blocks: "GGUFBlocks | Sequence[GGUFBlocks] | None" = None, device: torch.device | str = "cpu",
                keep_weight: bool = False) -> Linear:
    """A projection for ``precision`` from a dense weight and/or raw GGUF blocks (blocks win when exact).

    ``blocks`` is one weight or several stacked along the outputs, possibly of different block types. ``q8`` and
    ``gguf`` run the blocks through the compiled kernels (dense fp32 where they do not compute every part);
    ``int4`` uses 4-bit GGUF blocks as they are and quantises anything else; the dense schemes dequantise blocks
    exactly. ``keep_weight``: see ``OneDnnLinear``.

    Every kernel here is *row independent*: row i of the output depends on row i of
    the input only, bit for bit (the oneDNN and tinygemm kernels were checked for 1
    to 40 rows at the model's shapes; tests/test_model.py checks whole forwards), so
    verifying k draft tokens in one forward gives each row exactly what a one-token
    forward would give. That is what keeps speculation lossless. (The int4 scheme's
    bf16 rounding of every output would otherwise amplify last-bit differences into
    logit differences of ~0.3; see ``LlamaModel._run`` for the attention side.) There is deliberately no dynamic activation quantisation with a scale
    shared across rows (fbgemm's ``quantize_dynamic``): it would make row i depend
    on the other rows.

    Schemes (``Precision``):

    ``q8``
        The GGUF's own blocks (every type in ``kernels.KINDS``: ``Q4_0``, ``Q4_1``,
        ``Q5_0``, ``Q5_1``, ``Q8_0``, ``Q4_K``, ``Q5_K``, ``Q6_K``) through adaspec's
        integer kernels: each activation row is quantised on its own to int8 (one
        scale per 32 values, per 256 for the K-quants), as llama.cpp does, and
        multiplied with the weight codes in integer arithmetic. Computes llama.cpp's
        function for these formats, row independent. Weights in other types stay
        dense fp32.
    ``gguf``
        The GGUF's own blocks (``Q4_0``, ``Q4_1``, ``Q8_0``) as stored, through
        adaspec's compiled kernels (``adaspec/kernels``) with fp32 activations:
        each weight is dequantised to its exact fp32 value, so this computes the
        ``fp32`` scheme's function in another summation order. Weights the file
        does not hold in such blocks stay dense fp32. The default on CPU.
    ``fp32``
        Dense fp32 weights. On CPU the matmul runs through oneDNN with a prepacked
        weight: MKL's sgemm is pathologically slow for 2-16 rows on AMD CPUs
        (REFERENCES), oneDNN is not.
    ``int4``
        Group-wise 4-bit weights (groups of 32 along the input dimension) through
        PyTorch's CPU tinygemm kernel ``aten._weight_int4pack_mm_for_cpu``, which
        dequantises ``w = (q - 8) * scale + zero`` on the fly. GGUF ``Q4_0`` /
        ``Q4_1`` blocks map onto it exactly (``Q4_1``: ``w = d * q + m``, so
        ``scale = d``, ``zero = m + 8 d``); other weights are quantised min/max per
        group (lossy). The kernel's fast path takes bf16 activations and bf16
        scales, so the computed function is: inputs rounded to bf16, scales and
        zeros rounded to bf16, products accumulated in fp32, outputs rounded to
        bf16. llama.cpp itself rounds activations harder (to 8 bits per block of
        32), so this stays as close to the GGUF model as llama.cpp is.
    ``bf16`` / ``fp16``
        Dense half-precision weights with ``F.linear`` (the CUDA default).
    """
    device = torch.device(device)
    parts = [] if blocks is None else [blocks] if isinstance(blocks, GGUFBlocks) else list(blocks)
    if weight is None and not parts:
        raise ValueError("make_linear needs a weight or GGUF blocks")

    def dense() -> torch.Tensor:
        return weight if weight is not None else torch.cat([p.dequantize() for p in parts])

    if precision in ("gguf", "q8"):
        if kernels_take(parts, precision, device):
            return QLinear(parts, int8=precision == "q8")
        return OneDnnLinear(dense().to(device, torch.float32), keep_weight)
    if precision == "int4":
        if device.type != "cpu":
            raise ValueError("the int4 kernels are CPU kernels; use bf16 or fp16 on an accelerator")
        if parts and all(p.kind == parts[0].kind for p in parts) and parts[0].kind in INT4_KINDS:
            one = parts[0] if len(parts) == 1 else GGUFBlocks.cat(parts)
            return Int4Linear(*one.int4_parts(), device=device)
        return Int4Linear(*quantize_int4(dense()), device=device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    w = dense()
    if precision == "fp32":
        return OneDnnLinear(w.to(device, torch.float32), keep_weight)
    return DenseLinear(w.to(device, torch.bfloat16 if precision == "bf16" else torch.float16))

