#!/usr/bin/env bash
# Install llama-cpp-python into the given Python, built for this CPU family without -march=native.
#
# A native build of llama.cpp enables AMX on Intel Xeons, where ggml's AMX path segfaults on the first decode under
# KVM; a build for one machine may also use instructions another lacks. So the build names its instruction sets
# explicitly (AVX2 baseline, AVX-512 where the CPU has it, AMX never) and the wheel is cached per variant, so
# pip's own wheel cache can never hand a build made for one CPU family to another.
set -euo pipefail
PY=${1:?usage: install-llama-cpp.sh PYTHON}

# the pinned version and the instruction sets, from the same code as the llama-server build (standard library only)
read -r VERSION variant args <<<"$("$PY" "$(dirname "$0")/../adaspec/llamacpp_build.py" flags)"
[ -n "$variant" ] || exit 1

cache=${ADASPEC_CACHE:-$HOME/.cache/adaspec}/wheels/llama-cpp-python-$VERSION-$variant
if ! ls "$cache"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION for $variant (about 10 minutes, once per machine)"
  tmp=$(mktemp -d)
  CMAKE_ARGS="$args" FORCE_CMAKE=1 "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$tmp"
  mkdir -p "$cache"
  mv "$tmp"/llama_cpp_python-*.whl "$cache"/
  rm -rf "$tmp"
fi
"$PY" -m pip install -q --force-reinstall --no-deps "$cache"/llama_cpp_python-$VERSION-*.whl
echo "llama-cpp-python $VERSION ($variant build) installed"
