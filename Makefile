# One command for the demo, one for the tests; both set up the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench serve clean

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

demo: setup
	$(VENV)/bin/adaspec demo

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	$(PY) -m pip install -q -e '.[test,models]'
	$(VENV)/bin/pytest -q -m slow

bench: setup
	$(VENV)/bin/adaspec bench

serve: setup
	$(VENV)/bin/adaspec serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) build *.egg-info
