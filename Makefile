# `make demo` and `make test` do all set-up themselves: a .venv with every dependency,
# created on first use and reused after (re-installed only when pyproject.toml changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedcxr demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check common server client tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/evaluator_speed.py

clean:
	rm -rf runs demo-cohort .pytest_cache
