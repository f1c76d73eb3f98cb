# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.amstream-installed

.PHONY: setup demo test data bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Datasets that do not ship inside an installed package (Covertype, Elec2, Fashion-MNIST).
data: $(STAMP)
	$(VENV)/bin/amstream datasets --fetch all

demo: $(STAMP)
	$(VENV)/bin/amstream demo

test: $(STAMP)
	$(PY) -m pytest -q

bench-quick: $(STAMP)
	$(PY) benchmarks/paper_figures.py --quick
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) build *.egg-info
