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

# Installs dist/'s sdist the way README.md says (--no-build-isolation) into a fresh virtual environment
# and runs .ci/smoke_installed.py from outside the source tree. The fresh environment sees $(VENV)'s
# packages through a .pth file: it gets the pinned torch (and setuptools, wheel, ninja) without a
# second multi-GB install, while plastic_ops itself is installed into it alone (.pth folders are
# appended to sys.path, after the environment's own site-packages, and their own .pth files are
# not run, so nothing installed in $(VENV) can stand in for it). SDIST_CHECK_CUDA=1 keeps the CUDA
# kernels in that build (slow); by default it is CPU-only.
SDIST_CHECK_DIR ?= $(CURDIR)/build/sdist-check
sdist-check: sdist
	rm -rf $(SDIST_CHECK_DIR) && mkdir -p $(SDIST_CHECK_DIR)/src
	$(PYTHON) -m venv --without-pip $(SDIST_CHECK_DIR)/venv
	$(PY) -c 'import site, sys; print(site.getsitepackages()[0])' > \
	  "$$($(SDIST_CHECK_DIR)/venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/_reuse_venv.pth"
	tar xzf dist/plastic_ops-*.tar.gz -C $(SDIST_CHECK_DIR)/src
	cd $(SDIST_CHECK_DIR)/src/plastic_ops-* && \
	  PLASTIC_OPS_CPU_ONLY=$(if $(filter 1,$(SDIST_CHECK_CUDA)),0,1) \
	  $(SDIST_CHECK_DIR)/venv/bin/python -m pip install -q --no-build-isolation .
	cd $(SDIST_CHECK_DIR) && venv/bin/python $(CURDIR)/.ci/smoke_installed.py $(CURDIR)

clean:
	rm -rf build dist plastic_ops/_C*.so plastic_ops/_build_info.json *.egg-info
