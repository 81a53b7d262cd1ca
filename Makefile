# The two commands of README.md: `make bench` (fastopt vs torch on this machine's device) and
# `make test` (the test suite). Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastopt-installed
# torch's CPU build without a GPU (a local wheel on these machines), the CUDA build with one.
# A python that already has torch (e.g. a GPU machine's) keeps it: the venv sees its packages.
# From PyPI, pip on Linux picks torch's CUDA build (several GB); TORCH_INDEX=https://download.pytorch.org/whl/cpu
# fetches the CPU build instead (README.md, Install).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch==2.14.1,torch==2.13.0)
TORCH_INDEX ?=

.PHONY: bench test test-cpu test-reference test-triton test-cuda-build ctest info clean

# pytest-xdist: the suite split over one worker per CPU core (tests/conftest.py gives each worker
# its share of torch's threads). PYTEST_WORKERS=0 runs it in this process, e.g. to debug. The
# suite uses no pytest-benchmark fixture (bench/ does, run alone): its plugin, which warns under
# xdist, stays out.
PYTEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS) -p no:benchmark

bench: $(STAMP)
	@echo "make bench: every op on this machine's device, in rounds (a few minutes on 2 idle CPU cores, far longer on busy ones; progress below)"
	$(PY) -m fastopt bench

# README.md's and bench/RESULTS.md's figures from one fresh run: the bench (as `make bench`), then
# `fastopt report` rewrites their marked blocks and bench/results-cpu.png from that run's JSON.
# FIGURES_ARGS narrows the run (fastopt bench's flags), e.g. on a machine too busy for all of it.
FIGURES_OUT ?= bench-results/figures
FIGURES_ARGS ?=
.PHONY: figures
figures: $(STAMP)
	$(PY) -m fastopt bench --out $(FIGURES_OUT) $(FIGURES_ARGS)
	$(PY) -m fastopt report $(FIGURES_OUT) --update README.md bench/RESULTS.md --png bench/results-$(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu).png

test: $(STAMP)
	@echo "make test: the suite on CPU, one pytest worker per core (about 4-7 minutes on 2 cores; the last lines count skips by reason)"
	$(PYTEST)

# The suite forced onto the cpu backend (the C++ extension; plain `make test` picks it for CPU
# tensors too when it is built, so this fails instead of falling back when it is not).
test-cpu: $(STAMP)
	FASTOPT_BACKEND=cpu $(PYTEST)

# The suite on the plain-torch reference backend (the oracle), bit for bit against torch where
# torch's formulas allow it.
test-reference: $(STAMP)
	FASTOPT_BACKEND=torch $(PYTEST)

# The suite again on the Triton backend, its kernels run on CPU tensors by Triton's interpreter.
test-triton: $(STAMP)
	FASTOPT_BACKEND=triton TRITON_INTERPRET=1 $(PYTEST)

# tests/test_integrations.py against the real frameworks (HF transformers' Trainer, accelerate,
# Lightning, timm's AGC) from the registry, in a venv of their own: they pull ~50 packages that the
# main suite's venv stays without (there the file skips, with the reason). torch is pinned to the
# main venv's (tests/integrations/constraints.txt: pip never brings another torch); timm comes
# without its dependencies (its torchvision is built against another torch); fastopt is this
# checkout, its CPU extension built by $(STAMP).
INT_VENV ?= .venv-integrations
INT_PY := $(INT_VENV)/bin/python
INT_STAMP := $(INT_VENV)/.installed
.PHONY: test-integrations
test-integrations: $(STAMP) $(INT_STAMP)
	PYTHONPATH=$(CURDIR) $(INT_PY) -m pytest -p no:cacheprovider -rs tests/test_integrations.py

$(INT_STAMP): tests/integrations/requirements.txt tests/integrations/constraints.txt
	$(PYTHON) -m venv $(INT_VENV)
	$(INT_PY) -m pip install -q -c tests/integrations/constraints.txt torch
	$(INT_PY) -m pip install -q -c tests/integrations/constraints.txt -r tests/integrations/requirements.txt
	$(INT_PY) -m pip install -q --no-deps timm==1.0.29
	@touch $@

# The CUDA extension on a machine without a GPU: compiled against torch's CUDA build with the
# local nvcc (CUDA_HOME), loaded, its schemas, fake implementations and opcheck checked on meta
# tensors; then the host unit tests of csrc/ (ctest). The kernels run in `make gpu-check`.
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_STAMP := $(CUDA_VENV)/.fastopt-installed
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda

test-cuda-build: $(CUDA_STAMP) ctest
	CUDA_HOME=$(CUDA_HOME) FASTOPT_FORCE_CUDA_BUILD=1 MAX_JOBS=$${MAX_JOBS:-2} \
		$(CUDA_PY) -m pip install -v --no-build-isolation --no-deps -e . > $(CUDA_VENV)/build.log 2>&1 \
		|| { tail -n 60 $(CUDA_VENV)/build.log; exit 1; }
	@grep -m1 -o "fastopt: building the CUDA extension.*" $(CUDA_VENV)/build.log
	$(CUDA_PY) -m pytest tests/test_cuda_extension.py

$(CUDA_STAMP):
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q "$(CUDA_TORCH_SPEC)" numpy pytest expecttest "setuptools>=77" wheel ninja
	@touch $@

ctest:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

# The CUDA kernels executed on the CPU (csrc/emulation/README.md): the emulated device's own tests
# and every launcher under ThreadSanitizer and AddressSanitizer (run_checks.sh), then
# csrc/cuda/ (the kernels and their host side) built unchanged for the emulation (fastopt._C_emulated, CPU tensors)
# under the op suites, tests/test_cuda_backend.py and tests/test_cuda_planned.py. CUDA headers at build time only (CUDA_HOME);
# no GPU, no driver.
EMULATED_TESTS ?= tests/test_cuda_backend.py tests/test_cuda_planned.py tests/test_norm_scale.py tests/test_adamw.py tests/test_sgd.py tests/test_lion.py tests/test_clip.py \
	tests/test_amp.py tests/test_fuzz.py
.PHONY: test-cuda-emulated
test-cuda-emulated: $(STAMP)
	CUDA_HOME=$(CUDA_HOME) bash csrc/emulation/run_checks.sh
	CUDA_HOME=$(CUDA_HOME) $(PY) csrc/emulation/build.py
	FASTOPT_CUDA_EMULATION=1 FASTOPT_BACKEND=cuda $(PYTEST) -p no:cacheprovider $(EMULATED_TESTS)

info: $(STAMP)
	$(PY) -m fastopt info

# On the GPU machine (no venv, nothing downloaded), in one command of at most 8 minutes: build the
# CUDA extension, the GPU tests, the op suites on the cuda and triton backends, memcheck and the
# fp32 benchmark; gpu-check-extra (optional, at most 6 minutes): racecheck, synccheck, memcheck of
# the triton backend, the bf16 benchmark. Three files come back in $$OUT (scripts/gpu_check.sh says
# what each step does; `bash scripts/gpu_check.sh --dry-run` prints the plan anywhere). Back on the
# CPU machine, `make gpu-results JSON="…/gpu-check-main.json …"` appends them to bench/RESULTS.md.
.PHONY: gpu-check gpu-check-extra gpu-results
gpu-check:
	PYTHON="$(PYTHON)" bash scripts/gpu_check.sh --plan main

gpu-check-extra:
	PYTHON="$(PYTHON)" bash scripts/gpu_check.sh --plan extra

gpu-results: $(STAMP)
	@test -n "$(JSON)" || { echo 'usage: make gpu-results JSON="path/gpu-check-main.json [path/gpu-check-extra.json]"'; exit 2; }
	$(PY) scripts/gpu_results.py render $(JSON)

# First use only: 4 steps, each announced with what it does and how long it took on a 2-core
# machine (README.md, Two commands).
$(STAMP): pyproject.toml setup.py
	@echo "make: [1/4] creating $(VENV), which sees this python's packages (seconds)"
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "make: [2/4] torch is already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "make: [2/4] installing $(TORCH_SPEC)$(if $(TORCH_INDEX), from $(TORCH_INDEX)) (about 1-2 minutes from a local or CPU wheel;$(if $(TORCH_INDEX),, from PyPI on Linux it is the CUDA build, several GB: README.md, Install))"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || exit 1; \
	fi
	@echo "make: [3/4] installing setuptools and wheel, the build tools (seconds)"
	$(PY) -m pip install -q "setuptools>=77" wheel
	@echo "make: [4/4] installing fastopt (editable) with its test and bench packages, and compiling its C++ CPU extension (about 2-3 minutes; log: $(VENV)/install.log)"
	$(PY) -m pip install -v --no-build-isolation -e ".[test,bench]" > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; exit 1; }
	@grep -m1 -o "fastopt: CUDA extension.*" $(VENV)/install.log || true
	@grep -m1 -o "fastopt: CPU extension.*" $(VENV)/install.log || true
	@touch $@

clean:
	rm -rf $(VENV) .venv-* build fastopt/_build_info.py *.egg-info fastopt/_C*.so fastopt/_cpu*.so .pytest_cache .hypothesis .benchmarks
