# make demo: set up .venv (if missing) and run the efficiency study at demo scale on CPU
#            (single-task vs multi-task, 4 tasks x 3 seeds; report.md and plots in runs/demo).
# make test: set up .venv (if missing) and run the test suite (8 fake CPU devices; 2 xdist
#            workers; no persistent compilation cache: see README, Status).
# make lint: ruff and pyright.
# make studies: run every study at its full config (~95 min on 2 cores; finished arms are
#            skipped), publish each record to docs/studies/ and regenerate the README's findings.
# make findings: regenerate the README's study blocks from docs/studies/ (no training).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtjax-installed
DEMO_DIR ?= runs/demo

STUDIES ?= efficiency transfer entropy decomposition instructions weighting rl_diversity task_experts expert_composition fast_slow

.PHONY: demo test lint setup clean studies findings

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mtjax experiment efficiency --config configs/efficiency.py:demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

studies: $(STAMP)
	for s in $(STUDIES); do \
	  $(VENV)/bin/mtjax experiment $$s --config configs/$$s.py --workdir runs/$$s || exit $$?; \
	  $(PY) -m mtjax.experiments.findings publish runs/$$s $$s || exit $$?; \
	done
	$(VENV)/bin/mtjax experiment efficiency --config configs/efficiency.py:demo --workdir $(DEMO_DIR)
	$(PY) -m mtjax.experiments.findings publish $(DEMO_DIR) efficiency_demo
	$(PY) -m mtjax.experiments.findings sync

findings: $(STAMP)
	$(PY) -m mtjax.experiments.findings sync

# Lint and types (CI runs this before the tests): ruff, then pyright (configs in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright

clean:
	rm -rf runs .pytest_cache
