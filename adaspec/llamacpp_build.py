"""Builds of llama.cpp for this CPU family: the instruction sets, and llama-server from the pinned sources.

Both llama.cpp builds adaspec uses come from one source, the llama.cpp that the pinned llama-cpp-python sdist vendors,
and take their instruction sets from :func:`isa_variant`: AVX2 everywhere, AVX-512 where the CPU has it, never AMX
(ggml's AMX path segfaults on the first decode on Intel Xeons under KVM) and never ``-march=native``. Each build is
cached per variant, so a build made for one CPU family is never run on another.

    python adaspec/llamacpp_build.py flags        # "<version> <variant> <cmake args>" for tools/install-llama-cpp.sh
    python -m adaspec.llamacpp_build server       # find or build llama-server; prints its path

Standard library only: ``tools/install-llama-cpp.sh`` runs this file before adaspec is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The pinned llama-cpp-python; its sdist's ``vendor/llama.cpp`` is the llama.cpp of both builds."""

_BASE_ARGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              "-DGGML_BMI2=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
_AVX512_BASE = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")
_AVX512_EXTRAS = (("avx512_vnni", "vnni", "-DGGML_AVX512_VNNI=ON"), ("avx512vbmi", "vbmi", "-DGGML_AVX512_VBMI=ON"),
                  ("avx512_bf16", "bf16", "-DGGML_AVX512_BF16=ON"))


class BuildError(RuntimeError):
    """A llama.cpp build cannot be made here; the message says why and what to do."""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU in ``/proc/cpuinfo`` (or of the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def isa_variant(flags: set[str] | None = None) -> tuple[str, list[str]]:
    """(variant name, CMake arguments) for a CPU with these flags, e.g. ``("avx512-vnni", [...])``.

    Raises :class:`BuildError` for a CPU without AVX2.
    """
    flags = cpu_flags() if flags is None else flags
    args = list(_BASE_ARGS)
    if all(f in flags for f in _AVX512_BASE):
        variant = "avx512"
        args.append("-DGGML_AVX512=ON")
        for flag, suffix, arg in _AVX512_EXTRAS:
            if flag in flags:
                variant += f"-{suffix}"
                args.append(arg)
        return variant, args
    if "avx2" not in flags:
        raise BuildError("this CPU lacks AVX2, which adaspec's llama.cpp builds need")
    return "avx2", args + ["-DGGML_AVX512=OFF"]


def cache_dir() -> Path:
    """adaspec's cache (``$ADASPEC_CACHE``, else ``~/.cache/adaspec``), without importing adaspec."""
    return Path(os.environ.get("ADASPEC_CACHE") or Path.home() / ".cache" / "adaspec")


def server_path(variant: str | None = None) -> Path:
    """Where the llama-server of this CPU's variant is (or will be) cached."""
    variant = variant or isa_variant()[0]
    return cache_dir() / "bin" / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{variant}" / "llama-server"


SERVER_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    # nothing is downloaded: no prebuilt web UI, no npm build of one, no HTTPS client
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
)
"""The server build: a static binary (it runs from the cache with no library beside it), the server target only."""


def find_server(build: bool = True, log: Callable[[str], None] = print) -> Path:
    """The llama-server binary: ``$ADASPEC_LLAMA_SERVER`` if set, else the cached build for this CPU's variant, else
    (with ``build``) a new build, made once per machine (5-10 minutes on 2 cores). Raises :class:`BuildError` with
    the reason when there is none and none can be made."""
    given = os.environ.get("ADASPEC_LLAMA_SERVER")
    if given:
        if not os.access(given, os.X_OK):
            raise BuildError(f"ADASPEC_LLAMA_SERVER={given} is not an executable file")
        return Path(given)
    variant, args = isa_variant()
    path = server_path(variant)
    if path.is_file():
        return path
    if not build:
        raise BuildError(f"llama-server is not built yet ({path} is missing; `make peers` builds it)")
    build_server(path, args, variant, log)
    return path


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise BuildError(f"building llama-server needs {name!r} on PATH (Debian: apt-get install cmake g++ make)")
    return found


def _fetch_sdist(dest: Path) -> Path:
    """The pinned llama-cpp-python sdist, from the package index pip uses (pip's own cache makes a second call free)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode != 0 or not found:
        raise BuildError(f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist: "
                         f"{(r.stderr or r.stdout).strip()[-500:]}")
    return found[0]


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(dest, members=members, filter="data")
    roots = sorted(dest.glob("*/vendor/llama.cpp"))
    if not roots or not (roots[0] / "CMakeLists.txt").is_file():
        raise BuildError(f"{sdist.name} holds no vendor/llama.cpp")
    return roots[0]


def build_server(path: Path, isa_args: list[str], variant: str, log: Callable[[str], None] = print) -> None:
    """Build llama-server from the pinned sources into ``path`` (written whole: a stopped build leaves nothing)."""
    cmake, _ = _tool("cmake"), _tool("c++")
    jobs = str(os.cpu_count() or 2)
    log(f"building llama-server (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s llama.cpp) for {variant}: "
        "5-10 minutes on 2 cores, once per machine")
    with tempfile.TemporaryDirectory(prefix="adaspec-llama-server-") as tmp:
        work = Path(tmp)
        src = _extract_llama_cpp(_fetch_sdist(work), work / "src")
        build = work / "build"
        buildlog = work / "build.log"
        with open(buildlog, "w") as out:
            steps = [[cmake, "-S", str(src), "-B", str(build), *isa_args, *SERVER_CMAKE_ARGS],
                     [cmake, "--build", str(build), "--target", "llama-server", "-j", jobs]]
            for cmd in steps:
                if _run_with_progress(cmd, out, log) != 0:
                    tail = buildlog.read_text(errors="replace")[-2000:]
                    raise BuildError(f"the llama-server build failed ({' '.join(cmd[:3])} ...):\n{tail}")
        binary = build / "bin" / "llama-server"
        if not binary.is_file():
            raise BuildError(f"the build finished without {binary}")
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(path.name + ".tmp")
        shutil.copy2(binary, staged)
        os.replace(staged, path)
    log(f"llama-server built: {path}")


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _run_with_progress(cmd: list[str], out, log: Callable[[str], None]) -> int:
    """Run a build step, its output into ``out``; log a line at every tenth of CMake's percentage."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shown = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        out.write(line)
        m = _PERCENT.match(line)
        if m and int(m.group(1)) // 10 > shown:
            shown = int(m.group(1)) // 10
            log(f"  llama-server build {m.group(1)}%")
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv == ["flags"]:
            variant, args = isa_variant()
            print(LLAMA_CPP_PYTHON_VERSION, variant, " ".join(args))
            return 0
        if argv == ["server"]:
            print(find_server())
            return 0
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("usage: llamacpp_build.py flags | server", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
