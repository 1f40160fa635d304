# Set-up, build, tests and the benchmark, for a fresh machine with Python 3 and a C++ compiler.
#   make bench   - the main job: ash_ext and the shaping family against their references (python -m ash_ext bench --methods all)
#   make test    - lint and the test suite, with the CUDA kernels' quick emulation runs and
#                  resource checks (EMULATION=off skips the emulation, EMULATION=full runs it all)
#                  and the CPU build's sanitizer run (SANITIZERS=off skips it)
#   make sanitize - the C++ CPU kernel and front end under ASan + UBSan: a build of their own in
#                  build/sanitized, the parity/layout/in-place/edge-case tests, a LeakSanitizer check
#   make planted-bugs - shows each check of the CUDA emulator catching a bug planted for it
#   make large-sizes  - the release check of sizes past 2^31 elements (CPU kernel, then the CUDA
#                       kernels emulated at 1/500 of the sizes); too slow and too large for CI
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
SANITIZERS ?= on
# pytest-xdist workers for make test (the suite is mostly one-core work: two workers keep a
# 2-core machine busy), each with one intra-op thread unless OMP_NUM_THREADS says otherwise
# (two processes' OpenMP teams on two cores would wait on each other's preempted threads; the
# tests that need several threads set them)
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export CUDA_HOME TORCH_CUDA_ARCH_LIST

.PHONY: setup build test lint bench planted-bugs sanitize large-sizes clean

# pip -qq: errors only (this machine's pip configuration warns once per package about an index
# folder it lacks, ~50 lines that say nothing about the install).
PIP := $(PY) -m pip install -qq

$(VENV)/.deps-ready:
	@echo "setup: a venv in $(VENV) with torch 2.14.1 (CUDA 13.0 build), pytorch-ood 0.4.0, onnx/onnxruntime and the test tools"
	@start=$$(date +%s); step() { echo "  $$(( $$(date +%s) - start ))s  $$1"; }; \
	$(PYTHON) -m venv $(VENV) && \
	step "pip, setuptools, wheel" && $(PIP) --upgrade pip setuptools wheel && \
	step "$(TORCH_SPEC) (the largest download)" && $(PIP) $(TORCH_SPEC) && \
	step "ninja numpy scipy matplotlib pytest pytest-xdist hypothesis pytest-benchmark ruff" && \
	$(PIP) ninja numpy scipy typing_extensions matplotlib pytest pytest-xdist hypothesis pytest-benchmark ruff && \
	step "onnx onnxscript onnxruntime (the onnx extra: export tests)" && $(PIP) onnx onnxscript onnxruntime && \
	step "pytorch-ood 0.4.0 (--no-deps: keeps the torch above)" && $(PIP) --no-deps pytorch-ood==0.4.0 && \
	echo "setup: done in $$(( $$(date +%s) - start )) s"
	@touch $@

setup: $(VENV)/.deps-ready

# Rebuilt only when a source or setup.py changed since the last build in this venv. The build
# script prints what it builds, an estimate, one line per compiled file and the time taken; the
# editable install then only links the package into the venv (no second build).
SOURCES := setup.py tools/build_extension.py $(shell find csrc -type f 2>/dev/null)
$(VENV)/.built: $(VENV)/.deps-ready $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) tools/build_extension.py
	ASH_EXT_NO_EXTENSION=1 $(PIP) --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built
	$(PY) -c "import ash_ext; print('ash_ext built: extension', ash_ext.extension_loaded(), '| CUDA kernels', ash_ext.compiled_with_cuda())"

lint: setup
	$(VENV)/bin/ruff check .

test: build lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} ASH_EXT_EMULATION=$(EMULATION) ASH_EXT_SANITIZERS=$(SANITIZERS) \
		$(PY) -m pytest tests -q -p no:cacheprovider -n $(TEST_JOBS)

# tools/sanitized_cpu.py: builds its own sanitized ash_ext._C (not the one make build makes).
sanitize: setup
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) tools/sanitized_cpu.py

planted-bugs: setup
	$(PY) tests/emulation/planted_bugs.py

large-sizes: build
	$(PY) tools/large_sizes.py
	$(PY) tests/emulation/run_emulation.py --large 0.002

bench: build
	$(PY) -m ash_ext bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info ash_ext/_C*.so $(VENV)/.built
