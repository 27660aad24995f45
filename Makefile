# Quick start: `make check` (the fast tier, while working), `make test` (the
# full suite CI runs) and `make bench` each build their own virtualenv from
# nothing but Python 3.10+.
#
#   TORCH_SPEC  which torch to install (default: the CPU build, torch==2.13.0;
#               e.g. TORCH_SPEC='torch>=2.10' on a CUDA machine)
#   EXTRAS      package extras to install (default: test,gpu,bench = pytest,
#               hypothesis, pytest-benchmark, triton, tqdm and matplotlib)
#   BENCH_EXTRAS  the extras `make bench` alone installs (default: bench, plus
#               gpu where there is an NVIDIA GPU)
#   BENCH_ARGS  arguments for `fused_optim bench` (e.g. --full or --quick; or
#               --lists resnet50 gpt2-small --dtypes bf16 --precision kahan sr kahan+sr
#               for the precision options vs plain bf16, paired in one run)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,gpu,bench
BENCH_ARGS ?=
# numba's pedantic SSA check flags branches inside our inlined kernel helpers
PYTEST_ARGS ?= -W "ignore::numba.core.errors.NumbaIRAssumptionWarning"
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: check test bench fuzz clean compile-check

define make_venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(1)]"
	touch $@
endef

$(STAMP): setup.py
	$(call make_venv,$(EXTRAS))

# `make bench` on a fresh clone must answer within 5 minutes (issue 30), so
# it installs only what the bench needs: at load 5-6 on the 2-core VM the
# whole set took 113 s, triton and the test tools 20 s of it. Its own stamp:
# a later `make test` installs the rest into the same virtualenv.
comma := ,
BENCH_EXTRAS ?= bench$(if $(wildcard /dev/nvidia0),$(comma)gpu)
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): setup.py
	$(call make_venv,$(BENCH_EXTRAS))

# Test processes (pytest-xdist): most of a cold run is Numba compiling
# kernels, one specialization at a time per process; whole files go to one
# worker (--dist loadfile) so a file's tests never race each other, in the
# order tests/conftest.py gives them (slowest first): pytest-xdist 3.8 would
# otherwise hand out the files with the most tests first, which left the
# model-based machines (6 tests, minutes of subprocesses) to the end. The
# benchmark smoke run after it (every bench case once, tiny sizes) is one
# file, so its tests are dealt out one by one (--dist load): in one process
# it took 1:39 of the 17-minute cold CI run of 1e6d2e6. Its compiled cases
# trace with aot_eager, not Inductor (benchmarks/conftest.py): Inductor's code
# for its 72 compiled cases (24 of them torch.optim's own step) was about
# 90 s of its 155 s CPU from a cold cache.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)
	FUSED_OPTIM_BENCH_SIZE=tiny FUSED_OPTIM_BENCH_COMPILE_BACKEND=aot_eager $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable -n $(TEST_WORKERS) --dist load

# The fast tier (40 s warm on the idle 2-core dev VM, README "Tests"): the
# tests marked `check` by the rules in tests/conftest.py, every optimizer on
# the torch and Numba serial paths. One process by default: on 2 cores the
# workers' start-up costs more than they save (CHECK_WORKERS=2 to try).
CHECK_WORKERS ?= 0
check: $(STAMP)
	$(PY) -m pytest tests -m check -q -p no:cacheprovider -n $(CHECK_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The default run: SGD-momentum and AdamW, fp32 and bf16, on resnet50 and
# many-small, against torch's default and fastest paths and the ceiling,
# within 5 minutes of a fresh clone on 2 cores; its JSON and chart go to
# bench-results/. BENCH_ARGS=--full: every case (its duration is printed first).
bench: $(BENCH_STAMP)
	$(PY) -m fused_optim bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# The model-based test (tests/machine.py) at a larger budget, on new random
# examples each run: FUZZ_EXAMPLES machines of FUZZ_STEPS rules per backend.
FUZZ_EXAMPLES ?= 400
FUZZ_STEPS ?= 60
fuzz: $(STAMP)
	FUSED_OPTIM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUSED_OPTIM_FUZZ_STEPS=$(FUZZ_STEPS) \
	FUSED_OPTIM_FUZZ_RANDOM=1 $(PY) -m pytest tests/test_stateful.py -q -s -p no:cacheprovider

# Every Triton specialization the launchers of tests/_compile_matrix.py's
# kernels (all ten update kernels and their step kernels) can produce without
# Kahan/SR or low-precision state (`python tests/_compile_matrix.py --full
# --count`: 734 per arch; 394 before Adagrad's, RMSprop's, Adadelta's and
# Rprop's joined it, 2,114 for SGD and Adam alone before their arithmetic-only
# flags became runtime values), compiled offline for sm_80 and sm_90 and
# checked: no spills, IEEE math, 128-bit accesses where aligned. No GPU needed
# (on the 2-core dev VM, one job, cold Triton cache, SGD and Adam alone: the
# covering subset's 68 in 26 s, all 388 in 129 s). The Kahan/SR, bf16-state
# and 8-bit builds have covering subsets in test_precision_kernels.py,
# test_state_dtype.py and test_state_bits.py. Its first run with the whole
# RMSprop matrix (2026-12-08, 1,468 builds in 3 min 51 s, two jobs) found 4-16
# bytes of stack and spills in five RMSprop builds for sm_90 (none in the
# covering subset): benchmarks/results/compile-matrix-triton-3.9-2026-12-08.txt.
# Not fixed yet: it fails until they are.
compile-check: $(STAMP)
	$(PY) tests/_compile_matrix.py --full --check --archs 80,90

# The device check for a bare GPU machine (benchmarks/gpu_check.py, README
# "GPU check"): runs under PYTHON itself, builds no venv and fetches nothing;
# without a GPU it is a dry run. GPU_CHECK_OUT=DIR writes the results there.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
