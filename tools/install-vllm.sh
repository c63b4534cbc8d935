#!/usr/bin/env bash
# Create a virtual environment with vLLM (CPU build), adaspec and the suffix peer (ArcticInference) in it.
set -euo pipefail
VENV=${1:?usage: install-vllm.sh VENV}
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# the CPU build of torch first, so nothing pulls a multi-GB CUDA build
"$PY" -m pip install -q torch==2.13.0
"$(dirname "$0")/install-llama-cpp.sh" "$PY"
"$PY" -m pip install -q -e '.[test,vllm]'
# vLLM's dependency pull brings CUDA builds of these, which break `import vllm`; text models need none of them
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
# vLLM's `suffix` method needs ArcticInference, built from source here. Its CMake build runs `python3.11 -m nanobind`
# with whatever python3.11 comes first on PATH, and finds Python's headers only when told where they are: so the
# environment's own interpreter goes first on PATH and to CMake, whatever the machine's Python has installed. It
# may also pin an older protobuf, which breaks `import vllm`: put vLLM's back.
protobuf=$("$PY" -c 'import google.protobuf as p; print(p.__version__)')
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
bindir=$(cd "$(dirname "$PY")" && pwd)
PATH="$bindir:$PATH" CMAKE_ARGS="-DPython_EXECUTABLE=$bindir/python -DPython_INCLUDE_DIR=$include" \
  "$PY" -m pip install -q arctic-inference==0.3.0
"$PY" -m pip install -q "protobuf==$protobuf"
"$PY" -c 'import vllm, arctic_inference.suffix_decoding, adaspec.vllm.proposer'
