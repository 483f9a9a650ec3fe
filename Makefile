# make demo       — set up .venv (once) and run the main comparison on real digits data
# make test       — set up .venv (once) and run the test suite on 2 workers (PYTEST_ARGS="-k robust" adds pytest options)
# make test-fast  — the same without the slow tests (-m "not slow")
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2

.PHONY: setup test test-fast demo bench figures readme clean

setup: $(STAMP)

# torch first and alone: `torch==2.13.0` takes the local CPU wheel; letting another
# package pull torch would fetch GBs of CUDA packages.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# pytest-xdist: PYTEST_WORKERS processes (one per core: the suite is CPU-bound), one test at
# a time each (--maxschedchunk 1), the longest first (tests/conftest.py), so that neither
# worker is left with the long tail. PYTEST_WORKERS=0 runs in this process.
test: setup
	$(PY) -m pytest -q -ra --durations=25 -n $(PYTEST_WORKERS) --maxschedchunk 1 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -ra --durations=25 -n $(PYTEST_WORKERS) --maxschedchunk 1 -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/fl-subnet compare scenarios/digits-fedavg.toml scenarios/digits-ist.toml scenarios/digits-fedsubdrop.toml --out $(OUT)

# every bench/*.py benchmark -> bench/results.json + bench/results.md (BENCH_ARGS="--quick", "--only client,scale")
bench: setup
	$(PY) bench/run_all.py $(BENCH_ARGS)

# every image and results file in README.md and docs/, from the current code (runs under
# runs/figures, images to docs/), then the README's generated tables (make readme)
figures: setup
	$(PY) scripts/make_figures.py
	$(PY) -m fl_subnet.experiments.readme

# the README's generated blocks (protocol table, demo and quickstart tables) from the code and docs/
readme: setup
	$(PY) -m fl_subnet.experiments.readme

clean:
	rm -rf $(VENV) runs build *.egg-info
