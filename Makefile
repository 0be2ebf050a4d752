# make demo: set up .venv (if missing) and run the efficiency study at demo scale on CPU
#            (single-task vs multi-task, 4 tasks x 3 seeds; report.md and plots in runs/demo).
# make test: set up .venv (if missing) and run the test suite (8 fake CPU devices; 2 xdist
#            workers sharing one JAX compilation cache).
# make lint: ruff and pyright.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtjax-installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint setup clean

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

# Lint and types (CI runs this before the tests): ruff, then pyright (configs in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright

clean:
	rm -rf runs .pytest_cache
