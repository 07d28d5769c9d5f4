# `make demo` and `make test` each set everything up from a fresh clone, then run.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; pinning it first keeps pip from
# resolving an open range to a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
EXTRAS  ?= all

.PHONY: setup demo test bench clean

# setup.py builds the CPU kernel (src/qkv/csrc) into src/qkv at install: a changed source reinstalls.
$(BIN)/qkv: pyproject.toml setup.py $(wildcard src/qkv/csrc/*.c)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $(BIN)/qkv

setup: $(BIN)/qkv

demo: setup
	$(BIN)/qkv demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/qkv/*.so
