# `make demo` and `make test` each set everything up from a fresh clone, then run.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; pinning it first keeps pip from
# resolving an open range to a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
EXTRAS  ?= all

.PHONY: setup demo test lint test-c test-arm bench clean

# setup.py builds the CPU kernel (src/qkv/csrc) into src/qkv at install: a changed source reinstalls.
$(BIN)/qkv: pyproject.toml setup.py $(wildcard src/qkv/csrc/*.c src/qkv/csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $(BIN)/qkv

setup: $(BIN)/qkv

demo: setup
	$(BIN)/qkv demo

test: setup lint test-c
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Lint (rules in pyproject.toml); formatting is by hand, not enforced.
lint: setup
	$(BIN)/ruff check src tests benchmarks

# The CPU kernel's C tests (tests/csrc): every variant this CPU runs against a plain C reference. Natively with
# OpenMP (thread counts compared); for ARM64, cross-compiled without OpenMP and run under qemu-aarch64.
CC      ?= cc
ARM_CC  ?= aarch64-linux-gnu-gcc
QEMU    ?= qemu-aarch64
CSRC    := src/qkv/csrc
KERNEL  := $(CSRC)/attn_cpu.c $(CSRC)/attn_avx512.c $(CSRC)/attn_avx2.c $(CSRC)/attn_neon.c
CTEST   := tests/csrc/test_attn_cpu.c
CDEPS   := $(KERNEL) $(wildcard $(CSRC)/*.h) $(CTEST) tests/csrc/reference.h
CFLAGS_TEST := -O2 -std=gnu11 -fno-math-errno -ffp-contract=off -Wall -Wextra -Wno-unknown-pragmas -I$(CSRC)

build/test_attn_cpu: $(CDEPS)
	mkdir -p build
	$(CC) $(CFLAGS_TEST) -fopenmp $(CTEST) $(KERNEL) -lm -o $@

build/test_attn_cpu.arm64: $(CDEPS)
	mkdir -p build
	$(ARM_CC) $(CFLAGS_TEST) -static $(CTEST) $(KERNEL) -lm -o $@

# The kernel alone, timed (benchmarks/csrc/kernel_bench.c: profiling and A/B of kernel builds).
build/kernel_bench: $(CDEPS) benchmarks/csrc/kernel_bench.c
	mkdir -p build
	$(CC) -O3 -std=gnu11 -fno-math-errno -fopenmp -g -I$(CSRC) benchmarks/csrc/kernel_bench.c $(KERNEL) -lm -o $@

test-c: build/test_attn_cpu
	build/test_attn_cpu

test-arm:
	@command -v $(ARM_CC) >/dev/null && command -v $(QEMU) >/dev/null || \
	  { echo "installing gcc-aarch64-linux-gnu and qemu-user (Debian)"; \
	    apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null; }
	$(MAKE) build/test_attn_cpu.arm64
	$(QEMU) build/test_attn_cpu.arm64 -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/qkv/*.so
