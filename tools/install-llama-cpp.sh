#!/usr/bin/env bash
# Install llama-cpp-python into the given Python, built for this CPU family without -march=native.
#
# A native build of llama.cpp enables AMX on Intel Xeons, where ggml's AMX path segfaults on the first decode under
# KVM; a build for one machine may also use instructions another lacks. So the build names its instruction sets
# explicitly (AVX2 baseline, AVX-512 where the CPU has it, AMX never) and the wheel is cached per variant, so
# pip's own wheel cache can never hand a build made for one CPU family to another.
set -euo pipefail
PY=${1:?usage: install-llama-cpp.sh PYTHON}
VERSION=0.3.36

base="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
base="$base -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
if has avx512f && has avx512bw && has avx512vl && has avx512dq && has avx512cd; then
  variant=avx512
  args="$base -DGGML_AVX512=ON"
  has avx512_vnni && args="$args -DGGML_AVX512_VNNI=ON"
  has avx512vbmi && args="$args -DGGML_AVX512_VBMI=ON"
  has avx512_bf16 && args="$args -DGGML_AVX512_BF16=ON"
  variant="$variant$(has avx512_vnni && echo -vnni)$(has avx512vbmi && echo -vbmi)$(has avx512_bf16 && echo -bf16)"
else
  has avx2 || { echo "llama.cpp build: this CPU lacks AVX2, which adaspec needs" >&2; exit 1; }
  variant=avx2
  args="$base -DGGML_AVX512=OFF"
fi

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
