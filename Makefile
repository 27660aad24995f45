# Quick start: `make test` and `make bench` each build their own virtualenv
# from nothing but Python 3.10+.
#
#   TORCH_SPEC  which torch to install (default: the CPU build, torch==2.13.0;
#               e.g. TORCH_SPEC='torch>=2.4' on a CUDA machine)
#   EXTRAS      package extras to install (default: test,gpu = pytest,
#               hypothesis, pytest-benchmark and triton)
#   BENCH_ARGS  arguments for `fused_optim bench` (e.g. --quick)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,gpu
BENCH_ARGS ?=
# numba's pedantic SSA check flags branches inside our inlined kernel helpers
PYTEST_ARGS ?= -W "ignore::numba.core.errors.NumbaIRAssumptionWarning"
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)
	FUSED_OPTIM_BENCH_SIZE=tiny $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable

bench: $(STAMP)
	$(PY) -m fused_optim bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
