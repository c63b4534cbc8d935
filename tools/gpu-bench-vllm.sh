#!/usr/bin/env bash
# The vLLM benchmark on a CUDA machine: no speculation, vLLM's ngram and suffix methods, and adaspec's proposer,
# over the drift stream twice (cold, then repeated traffic). Needs a Python with vLLM for CUDA and adaspec
# installed (pip install -e '.[vllm-cuda]'; arctic-inference for the suffix method). Nothing is downloaded:
# MODEL is a Hugging Face directory or a GGUF on this machine (default: the bundled model, exported first).
# Usage: tools/gpu-bench-vllm.sh [MODEL] [OUT]   (about 5-8 minutes of GPU time for the bundled model)
set -euo pipefail
PY=${PYTHON:-python3}
MODEL=${1:-}
OUT=${2:-runs/bench-vllm-gpu-$(date +%Y%m%d-%H%M%S)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c 'import torch, vllm; assert torch.cuda.is_available(), "no CUDA device"; print("vllm", vllm.__version__)'
args=(--engine vllm --scenario drift --passes 2 --out "$OUT")
[[ -n "$MODEL" ]] && args+=(--model "$MODEL")
"$PY" -m adaspec bench "${args[@]}"
