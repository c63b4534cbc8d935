"""``python -m adaspec.kernels``: build the CPU kernels now (``make setup`` runs it) and say which path runs."""

from . import available, isa, qmm8_isa, unavailable_reason

if available():
    print(f"adaspec CPU kernels ready ({isa()}; int8 activations: {qmm8_isa()})")
else:
    print(f"adaspec CPU kernels unavailable: {unavailable_reason()}; torch's kernels will be used")
