"""adaspec's compiled CPU kernels: matrix products over GGUF weight blocks with fp32 activations (``qmm.cpp``) or
with int8 activations quantised row by row (``qmm8.cpp``), and the decoder layers of a model built on them
(``decoder.cpp``), all row independent by construction.

Compiled once per machine and torch version on first use and cached (:func:`build`); where that fails the model
falls back to torch's kernels. ``reference_qmm`` is the plain computation the kernels must agree with.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["KINDS", "FP32_KINDS", "ISAS", "available", "unavailable_reason", "isa", "qmm8_isa", "force_isa", "qmm",
           "qmm8", "reference_qmm", "reference_qmm8", "build", "limit_this_thread"]

# GGUF block types the kernels compute with int8 activations (codes as in qmm.h)
KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q5_0": 3, "Q5_1": 4, "Q4_K": 5, "Q5_K": 6, "Q6_K": 7}
FP32_KINDS = ("Q4_0", "Q4_1", "Q8_0")  # ... and with fp32 activations
# code paths, in qmm.cpp's numbering; on `avx512` the int8-activation kernels (qmm8) run AVX-512-VNNI code where the
# CPU has VNNI and their AVX2 code where it does not (qmm8_isa says which)
ISAS = ("scalar", "avx2", "avx512")
_HERE = Path(__file__).parent
_SOURCES = [_HERE / "qmm.cpp", _HERE / "qmm8.cpp", _HERE / "vector.cpp", _HERE / "decoder.cpp"]
_HEADERS = [_HERE / "qmm.h", _HERE / "qmm8_tile.h"]
_state: dict[str, object] = {}


def _build_dir() -> Path:
    from ..files import cache_root

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*_SOURCES, *_HEADERS])).hexdigest()[:16]
    return cache_root() / "kernels" / f"torch-{torch.__version__}-{digest}"


def build() -> None:
    """Compile (or find the cached build of) the extension and load it into this process; raises on failure.

    The extension is compiled once per machine and torch version on first use (about 30 s; ``make setup`` does it
    ahead of time) and cached under ``$ADASPEC_CACHE/kernels``. Where it cannot be built or loaded (no C++
    compiler, a torch without headers), ``available()`` is false, ``unavailable_reason()`` says why, and the
    model falls back to torch's kernels. The code path (AVX-512, AVX2, scalar) is picked from the CPU at run time
    (for ``qmm8``, AVX-512 means AVX-512-VNNI: see :func:`qmm8_isa`); ``ADASPEC_KERNELS_ISA=avx2`` (or ``scalar``)
    runs a narrower one, to measure what another CPU family would get.
    """
    if "loaded" in _state:
        return
    from torch.utils import cpp_extension

    folder = _build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # No implicit fused multiply-adds: every one is written out, so the compiler cannot fuse an operation in
    # one tile shape and not in another. A plain shared library of torch operators (no Python module): torch.ops.adaspec_kernels.*. It links
    # torch's own OpenMP runtime, so its parallel loops run in torch's thread pool.
    cpp_extension.load(name="adaspec_kernels", sources=[str(p) for p in _SOURCES], build_directory=str(folder),
                       extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"], is_python_module=False,
                       verbose=False)
    _state["loaded"] = True
    if os.environ.get("ADASPEC_KERNELS_ISA"):  # run a narrower path than the CPU allows, e.g. avx2 on an AVX-512 CPU
        force_isa(os.environ["ADASPEC_KERNELS_ISA"])


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call); logs once why not."""
    if "loaded" in _state:
        return True
    if "error" not in _state:
        try:
            build()
            log.info("adaspec CPU kernels loaded (%s; int8 activations: %s)", isa(), qmm8_isa())
            return True
        except Exception as e:  # compiler missing, build failure, load failure: all mean "use torch's kernels"
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
            log.warning("adaspec CPU kernels unavailable, falling back to torch's kernels: %s", _state["error"])
    return False


def unavailable_reason() -> str | None:
    """Why ``available()`` is false, once it has been asked; ``None`` otherwise."""
    return None if "loaded" in _state else _state.get("error")  # type: ignore[return-value]


def isa() -> str:
    """The instruction set the kernels run on in this process: ``avx512``, ``avx2`` or ``scalar``."""
    build()
    return ISAS[int(torch.ops.adaspec_kernels.isa())]


def qmm8_isa() -> str:
    """The code path ``qmm8`` (int8 activations) runs on in this process: ``avx512vnni`` where :func:`isa` is
    ``avx512`` and the CPU has AVX-512-VNNI (with VL), else ``avx2`` on any AVX2 path, else ``scalar``. All three
    give the same results bit for bit."""
    build()
    return ("scalar", "avx2", "avx512vnni")[int(torch.ops.adaspec_kernels.qmm8_isa())]


def force_isa(name: str | None) -> str:
    """Run a narrower code path than the CPU allows (tests), or ``None`` to go back to the best; returns the active one.

    Each ``qmm`` path sums in its own fixed order, so its outputs differ between paths in the last bits; ``qmm8``'s
    paths agree bit for bit.
    """
    build()
    if name is not None and name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {', '.join(ISAS)}")
    want = -1 if name is None else ISAS.index(name)
    return ISAS[int(torch.ops.adaspec_kernels.set_isa(want))]


def qmm(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """``x [n, K] float32 @ dequant(blocks) [N, K]^T -> [n, N] float32``; ``blocks`` is ``[N, K / 32 * bytes]`` uint8."""
    return torch.ops.adaspec_kernels.qmm(x, blocks, KINDS[kind])


def qmm8(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """``q8(x) [n, K] @ dequant(blocks) [N, K]^T -> [n, N] float32``: each row of ``x`` quantised on its own to int8
    blocks (32 values a block, 256 for the K-quants), integer dot products with the weight blocks (qmm8.cpp).
    Rearranges the blocks (``pack8``) on every call; a model packs each weight once (``QLinear``)."""
    if kind not in KINDS:
        raise ValueError(f"the adaspec kernels do not compute {kind} blocks; they compute {', '.join(KINDS)}")
    return torch.ops.adaspec_kernels.qmm8(x, pack8(blocks, kind), KINDS[kind], blocks.shape[0])


def pack8(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """GGUF blocks ``[N, K / block * bytes]`` rearranged for ``qmm8`` (8 output rows interleaved; same bytes)."""
    if kind not in KINDS:
        raise ValueError(f"the adaspec kernels do not compute {kind} blocks; they compute {', '.join(KINDS)}")
    return torch.ops.adaspec_kernels.pack8(blocks, KINDS[kind])


def quantise_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """What ``qmm8`` makes of ``x [n, K]``: each run of ``block`` values scaled by max|x| / 127 and rounded to the
    nearest integer (ties to even), returned dequantised (fp32, exact)."""
    g = x.float().reshape(x.shape[0], -1, block)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(g * inv) * d).reshape(x.shape)


def reference_qmm8(x: torch.Tensor, blocks: "GGUFBlocks") -> torch.Tensor:  # noqa: F821
    """What ``qmm8`` computes, up to the order of fp32 additions: the row-quantised activations times the exactly
    dequantised weights, summed in float64."""
    block = 256 if blocks.kind.endswith("_K") else 32
    return (quantise_rows(x, block).double() @ blocks.dequantize().double().T).float()


def reference_qmm(x: torch.Tensor, blocks: "GGUFBlocks") -> torch.Tensor:  # noqa: F821
    """What ``qmm`` computes, up to the order of fp32 additions: exact dequantisation, then an fp32 matmul."""
    return x.float() @ blocks.dequantize().T


def limit_this_thread(threads: int) -> bool:
    """Give the calling thread an OpenMP team of ``threads`` (torch's and these kernels' parallel loops alike),
    without changing any other thread's; returns whether it could.

    ``torch.set_num_threads`` would also change the process-wide default that every thread starting later
    inherits. A helper thread (a background learner) with a team of its own would put more OpenMP threads in the
    process than cores, and libgomp then makes every parallel region, decoding's included, sleep and wake
    instead of spinning. So the helper calls this first: torch's per-thread setup runs, then libgomp's own
    per-thread setting is lowered.
    """
    import ctypes

    torch.get_num_threads()  # torch's per-thread initialisation first, or it would overwrite the setting below
    paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
             if "libgomp" in line and line.split()[-1].startswith("/")} if Path("/proc/self/maps").exists() else set()
    for path in sorted(paths):
        try:
            ctypes.CDLL(path).omp_set_num_threads(int(threads))
        except (OSError, AttributeError):
            continue
        return True
    return False
