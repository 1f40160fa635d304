# Set-up, build, tests and the benchmark, for a fresh machine with Python 3 and a C++ compiler.
#   make bench   - the main job: ash_ext and the shaping family against their references (python -m ash_ext bench --methods all)
#   make test    - lint and the test suite, with the CUDA kernels' quick emulation runs and
#                  resource checks (EMULATION=off skips the emulation, EMULATION=full runs it all)
#   make planted-bugs - shows each check of the CUDA emulator catching a bug planted for it
# Both create .venv, install what is needed and build the extension first.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch 2.14.1 is a CUDA 13.0 build: with a CUDA toolkit present the CUDA kernels are compiled
# too (no GPU needed). TORCH_CUDA_ARCH_LIST defaults to sm_90 here to keep the build short;
# setup.py's own default, for pip installs, is sm_80, sm_86, sm_89 and sm_90.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 9.0
BENCH_ARGS ?= --methods all
EMULATION ?= quick
export CUDA_HOME TORCH_CUDA_ARCH_LIST

.PHONY: setup build test lint bench planted-bugs clean

$(VENV)/.deps-ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet ninja numpy scipy typing_extensions matplotlib pytest hypothesis pytest-benchmark ruff
	# pytorch-ood 0.4.0, for parity tests and the benchmark; --no-deps keeps the torch above.
	$(PY) -m pip install --quiet --no-deps pytorch-ood==0.4.0
	touch $@

setup: $(VENV)/.deps-ready

# Rebuilt only when a source or setup.py changed since the last build in this venv.
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
$(VENV)/.built: $(VENV)/.deps-ready $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

build: $(VENV)/.built
	$(PY) -c "import ash_ext; print('ash_ext built: extension', ash_ext.extension_loaded(), '| CUDA kernels', ash_ext.compiled_with_cuda())"

lint: setup
	$(VENV)/bin/ruff check .

test: build lint
	ASH_EXT_EMULATION=$(EMULATION) $(PY) -m pytest tests -q -p no:cacheprovider

planted-bugs: setup
	$(PY) tests/emulation/planted_bugs.py

bench: build
	$(PY) -m ash_ext bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info ash_ext/_C*.so $(VENV)/.built
