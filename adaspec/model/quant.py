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

Precision = Literal["gguf", "fp32", "int4", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("gguf", "fp32", "int4", "bf16", "fp16")
GROUP = 32  # weights per quantisation group (GGUF blocks and the int4 kernel alike)

# GGUF block layouts this module reads: bytes per block of 32 weights.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
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

    ``data`` is ``[out, in / 32 * block_bytes]`` uint8: each row is a run of
    blocks of 32 weights. ``Q4_0``: fp16 ``d`` then 16 bytes of nibbles,
    ``w = d * (q - 8)``. ``Q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles,
    ``w = d * q + m``. ``Q8_0``: fp16 ``d`` then 32 int8, ``w = d * q``. In the
    nibble bytes, byte j holds weight j in its low nibble and weight j + 16 in
    its high nibble.
    """

    kind: str
    data: torch.Tensor  # [out, groups * block_bytes] uint8

    def __post_init__(self) -> None:
        if self.kind not in _BLOCK_BYTES:
            raise ValueError(f"unsupported GGUF block type {self.kind}")
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] % _BLOCK_BYTES[self.kind]:
            raise ValueError(f"{self.kind} data must be a [rows, k * {_BLOCK_BYTES[self.kind]}] uint8 tensor")

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight."""
        return self.data.shape[0], self.data.shape[1] // _BLOCK_BYTES[self.kind] * GROUP

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
        q, scale, zero = self.int4_parts()
        return dequantize_int4(q, scale, zero)

    def rows(self, index: torch.Tensor) -> "GGUFBlocks":
        """The same weight with its rows reordered (quantisation groups run along rows, so this is exact)."""
        return GGUFBlocks(self.kind, self.data[index])

    @staticmethod
    def quantize(w: torch.Tensor, kind: str) -> "GGUFBlocks":
        """Blocks of ``kind`` for dense weights ``w [out, in]`` (lossy), by the ``gguf`` package's reference
        quantisers (llama.cpp's recipes); for tests and random models."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        if kind not in _BLOCK_BYTES:
            raise ValueError(f"unsupported GGUF block type {kind}")
        if w.dim() != 2 or w.shape[1] % GROUP:
            raise ValueError(f"GGUF blocks need a [out, in] weight with in a multiple of {GROUP}")
        data = quantize(w.detach().float().cpu().numpy(), GGMLQuantizationType[kind])
        return GGUFBlocks(kind, torch.from_numpy(np.ascontiguousarray(data)))

    @staticmethod
    def cat(parts: Sequence["GGUFBlocks"]) -> "GGUFBlocks":
        """Stack weights along the output dimension (all of one kind)."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse GGUF weights of different types {sorted(kinds)}")
        return GGUFBlocks(kinds.pop(), torch.cat([p.data for p in parts]))


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
    """GGUF blocks through adaspec's compiled kernels, fp32 activations (see ``adaspec/kernels/qmm.cpp``).

    Row independent by construction, for every number of rows; the data stays in the GGUF layout.
    """

    def __init__(self, blocks: GGUFBlocks):
        from .. import kernels

        if blocks.kind not in kernels.KINDS:
            raise ValueError(f"the adaspec kernels do not compute {blocks.kind} blocks")
        self.kind = blocks.kind
        self.data = blocks.data.contiguous()  # [out, groups * block_bytes] uint8
        self.out_features, self.in_features = blocks.shape
        self.weight = None
        self._op = torch.ops.adaspec_kernels.qmm
        self.code = kernels.KINDS[blocks.kind]  # the block kind as the compiled kernels number it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x if x.dtype == torch.float32 else x.float(), self.data, self.code)


def gguf_kernels_take(blocks: GGUFBlocks | None, device: torch.device | str = "cpu") -> bool:
    """Whether ``gguf`` precision runs these blocks through the compiled kernels (else dense fp32)."""
    from .. import kernels

    return (blocks is not None and torch.device(device).type == "cpu" and blocks.kind in kernels.KINDS
            and kernels.available())


def make_linear(precision: str, weight: torch.Tensor | None = None, blocks: GGUFBlocks | None = None,
                device: torch.device | str = "cpu", keep_weight: bool = False) -> Linear:
    """A projection for ``precision`` from a dense weight and/or raw GGUF blocks (blocks win when exact).

    ``gguf`` runs the blocks through the compiled kernels (dense fp32 for a weight without blocks); ``int4`` uses 4-bit GGUF blocks as they are and quantises anything else;
    the dense schemes dequantise blocks exactly. ``keep_weight``: see ``OneDnnLinear``.

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
    if weight is None and blocks is None:
        raise ValueError("make_linear needs a weight or GGUF blocks")
    if precision == "gguf":
        if gguf_kernels_take(blocks, device):
            return QLinear(blocks)
        return OneDnnLinear((weight if weight is not None else blocks.dequantize()).to(device, torch.float32),
                            keep_weight)
    if precision == "int4":
        if device.type != "cpu":
            raise ValueError("the int4 kernels are CPU kernels; use bf16 or fp16 on an accelerator")
        if blocks is not None and blocks.kind in INT4_KINDS:
            return Int4Linear(*blocks.int4_parts(), device=device)
        w = weight if weight is not None else blocks.dequantize()
        return Int4Linear(*quantize_int4(w), device=device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    w = weight if weight is not None else blocks.dequantize()
    if precision == "fp32":
        return OneDnnLinear(w.to(device, torch.float32), keep_weight)
    return DenseLinear(w.to(device, torch.bfloat16 if precision == "bf16" else torch.float16))

