# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
# Both create .venv if missing, install torch and the dependencies, build the extension in place
# (incremental), then run. `make install` also registers the `elmo-fast` command (pip, editable).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch 2.14.1 is a CUDA build that also runs on CPU-only machines, so the CUDA kernels always
# compile; `make TORCH=torch==2.13.0 ELMO_FAST_CUDA=0 test` gives the small CPU-only setup.
TORCH ?= torch==2.14.1
DEPS := numpy h5py tqdm pytest pytest-benchmark matplotlib ninja "setuptools>=77" wheel
PYTEST_ARGS ?= -q

# Facts from ../shared/build-env.md: CUDA_HOME must point at the toolkit (nvcc on PATH may be a
# wrapper elsewhere); parallel compile jobs are capped on small machines.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: test bench bench-quick build install cmake clean venv gpu-verify
.DEFAULT_GOAL := test

$(VENV)/.deps-installed:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH) $(DEPS)
	touch $@

venv: $(VENV)/.deps-installed

# Rebuilt only when a source changed (make's timestamps; setup.py/ninja then recompile what changed).
EXT := elmo_fast/_C.abi3.so
$(EXT): $(VENV)/.deps-installed setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(EXT)

install: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) -m elmo_fast.cli bench

bench-quick: build
	$(PY) -m elmo_fast.cli bench --quick

# On a GPU machine with torch installed (no venv, no internet): build, CUDA tests, sanitizers, benchmarks.
gpu-verify:
	scripts/gpu-verify

# The same library through CMake (for C++ users and IDEs); CPU only unless ELMO_FAST_CUDA=1.
cmake: venv
	cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DELMO_FAST_CUDA=$(if $(filter 1,$(ELMO_FAST_CUDA)),ON,OFF)
	cmake --build build-cmake

clean:
	rm -rf build build-cmake elmo_fast/_C*.so
