# One-command workflows. `make study` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PRESET ?= cpu
OUT ?= outputs/$(PRESET)
JOBS ?=
SEEDS ?=

.PHONY: setup sysdeps test test-fast study smoke-study lab bench bench-data bench-train bench-eval bench-run bench-identity clean-venv

setup: $(STAMP) sysdeps

# The Python stack, pinned in pyproject.toml; torch is installed in the same pip call as the
# rest so that pip never picks another build. Skipped while pyproject.toml is unchanged.
$(STAMP): pyproject.toml
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "error: $(PYTHON_BOOT) not found (Python 3.11 is required; set PYTHON_BOOT=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

# System libraries for headless OpenGL (moderngl on EGL; Mesa llvmpipe on a CPU).
sysdeps: $(STAMP)
	@bash scripts/sysdeps.sh $(PY)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

study: setup
	$(PY) -m dad3dlib study --preset $(PRESET) --out $(OUT) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS))

smoke-study:
	$(MAKE) study PRESET=smoke

lab: setup
	$(PY) -m ipykernel install --user --name dad3d --display-name "dad3dlib (.venv)"
	$(VENV)/bin/jupyter lab notebooks/

bench: bench-data bench-train bench-eval bench-run

bench-data: setup
	$(PY) benchmarks/bench_data.py

bench-train: setup
	$(PY) benchmarks/bench_train.py

bench-eval: setup
	$(PY) benchmarks/bench_eval.py

bench-run: setup
	$(PY) benchmarks/bench_run.py --preset $(PRESET)

# What stops a run from learning identity (generated data; RUN=a run directory adds the network's part)
bench-identity: setup
	$(PY) benchmarks/identity.py --preset $(PRESET) $(if $(RUN),--run $(RUN))

clean-venv:
	rm -rf $(VENV)
