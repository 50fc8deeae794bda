# Two commands on a fresh machine:
#   make demo   virtual environment + build + a short pattern-memorization training on the CPU
#   make test   virtual environment + build + the test suite
# and for packaging:
#   make sdist-check   the source distribution, installed into a fresh virtual environment, smoke-tested
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# The CUDA toolkit (if any) for compiling csrc/cuda; a wrapper nvcc on PATH would mislead torch.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif

.PHONY: demo test build bench sdist sdist-check info clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# In place: `python -m experiments...`, pytest and the benchmarks run from this folder.
build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

info: build
	$(PY) -m plastic_ops.info

demo: build
	$(PY) -m experiments.demo

test: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m benchmarks.compare --device cpu --headline --out results/bench_headline

# The sdist is made from a CPU-only configuration on purpose: it must still ship csrc/cuda.
sdist: $(VENV)/.installed
	rm -rf dist/plastic_ops-*.tar.gz
	PLASTIC_OPS_CPU_ONLY=1 $(PY) setup.py -q sdist -d dist

# The sdist installed with --no-build-isolation into a fresh virtual environment, smoke-tested
# outside the source tree (how, and why the environment reuses $(VENV)'s torch: .ci/sdist_check.sh).
sdist-check: sdist
	bash .ci/sdist_check.sh $(PY)

clean:
	rm -rf build dist plastic_ops/_C*.so plastic_ops/_build_info.json *.egg-info

# Every supported torch release (2.4.1 to 2.14.1), each in a fresh virtual environment and a fresh
# copy of this tree, built CPU-only and the whole test suite run: the README's "Tested range" table
# (how: .ci/torch_matrix.py; results/torch-matrix.md also lists the failing tests). Long: one
# torch install, build and test run after the other.
.PHONY: torch-matrix test-oldest-torch
torch-matrix:
	$(PYTHON) .ci/torch_matrix.py --write-readme --made-by "make torch-matrix"

# The oldest supported torch alone (what CI runs after `make test`); README.md is left as it is.
test-oldest-torch:
	$(PYTHON) .ci/torch_matrix.py --torch 2.4.1 --made-by "make test-oldest-torch"
