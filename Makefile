# Two commands on a fresh machine:
#   make demo   virtual environment + build + a short pattern-memorization training on the CPU
#   make test   virtual environment + build + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# The CUDA toolkit (if any) for compiling csrc/cuda; a wrapper nvcc on PATH would mislead torch.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif
export TORCH_CUDA_ARCH_LIST ?= 9.0

.PHONY: demo test build bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m experiments.demo

test: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m benchmarks.compare --device cpu --headline --out results/bench_headline

clean:
	rm -rf build plastic_ops/_C*.so *.egg-info
