"""The installed llama.cpp (the peer every speed claim is measured against) is built for this CPU family:
no AMX code (ggml's AMX path segfaults under KVM), and no AVX-512 code where the CPU lacks AVX-512. The same check
runs on the llama-server build (tests/test_llama_server.py, slow)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def _ggml_cpu_library() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama_cpp is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("lib/libggml-cpu*.so*"))
    if not found:
        pytest.skip("this llama_cpp build has no separate libggml-cpu")
    return found[0]


def assert_built_for_this_cpu(binary: Path) -> None:
    """No AMX instruction in ``binary``, and no AVX-512 register where this CPU lacks AVX-512."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    assert len(text) > 100_000  # really disassembled
    assert not re.search(r"\b(tileloadd|tileloaddt1|tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps|ldtilecfg)\b", text)
    flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    if "avx512f" not in flags:
        assert "zmm" not in text, "an AVX-512 build on a CPU without AVX-512"


def test_llama_cpp_has_no_amx_and_no_instructions_this_cpu_lacks() -> None:
    assert_built_for_this_cpu(_ggml_cpu_library())
