# make demo: set up .venv (if missing) and run the efficiency study at demo scale on CPU
#            (single-task, multi-task and masked-joint runs, 2 tasks x 3 seeds; report.md and plots in runs/demo).
# make test: set up .venv (if missing) and run the default test tier: 1 fake CPU device, 2 xdist
#            workers, JAX's persistent compilation cache in a per-run directory (README, Testing).
# make test-slow: the other tier: the slow end-to-end tests (1 device, cached), then the
#            multidevice tests on 8 fake devices without the cache. make test-all: both (CI).
# make lint: ruff and pyright.
# make studies: run every study at its full config (10 seeds each: about 6 hours on 2 cores, the
#            times per study are in the README; finished arms are skipped), publish each record
#            to docs/studies/ and regenerate the README's findings.
# make findings: regenerate the README's study blocks from docs/studies/ (no training).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtjax-installed
DEMO_DIR ?= runs/demo

STUDIES ?= efficiency transfer entropy decomposition instructions weighting rl_diversity task_experts expert_composition fast_slow

.PHONY: demo test test-slow test-all lint setup clean studies findings

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mtjax experiment efficiency --config configs/efficiency.py:demo --workdir $(DEMO_DIR)

# Each tier starts from an empty cache directory (a per-run cache: nothing carries over between
# runs); XLA_FLAGS and the cache settings are applied by tests/conftest.py.
TEST_CACHE := .test-cache
PYTEST := $(PY) -m pytest -q -n 2 -p no:cacheprovider

test: $(STAMP)
	rm -rf $(TEST_CACHE)/default && mkdir -p $(TEST_CACHE)/default
	MTJAX_TEST_DEVICES=1 MTJAX_TEST_CACHE=$(abspath $(TEST_CACHE))/default \
	  $(PYTEST) -m "not slow and not multidevice"

test-slow: $(STAMP)
	rm -rf $(TEST_CACHE)/slow && mkdir -p $(TEST_CACHE)/slow
	MTJAX_TEST_DEVICES=1 MTJAX_TEST_CACHE=$(abspath $(TEST_CACHE))/slow \
	  $(PYTEST) -m "slow and not multidevice"
	MTJAX_TEST_DEVICES=8 $(PYTEST) -m multidevice

test-all: test test-slow

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
	rm -rf runs .pytest_cache $(TEST_CACHE)
