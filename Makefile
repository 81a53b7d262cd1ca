# The two commands of README.md: `make bench` (fastopt vs torch on this machine's device) and
# `make test` (the test suite). Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastopt-installed
# torch's CPU build without a GPU (a local wheel on these machines), the CUDA build with one.
# A python that already has torch (e.g. a GPU machine's) keeps it: the venv sees its packages.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch==2.14.1,torch==2.13.0)

.PHONY: bench test test-triton info clean

bench: $(STAMP)
	$(PY) -m fastopt bench

test: $(STAMP)
	$(PY) -m pytest

# The suite again on the Triton backend, its kernels run on CPU tensors by Triton's interpreter.
test-triton: $(STAMP)
	FASTOPT_BACKEND=triton TRITON_INTERPRET=1 $(PY) -m pytest

info: $(STAMP)
	$(PY) -m fastopt info

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -v --no-build-isolation -e ".[test,bench]" > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; exit 1; }
	@grep -m1 -o "fastopt: CUDA extension.*" $(VENV)/install.log || true
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info fastopt/_C*.so .pytest_cache .hypothesis .benchmarks
