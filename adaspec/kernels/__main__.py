"""``python -m adaspec.kernels``: build the CPU kernels now (``make setup`` runs it) and say which path runs."""

from . import available, isa, unavailable_reason

if available():
    print(f"adaspec CPU kernels ready ({isa()})")
else:
    print(f"adaspec CPU kernels unavailable: {unavailable_reason()}; torch's kernels will be used")
