# `make demo` and `make test` do all set-up themselves: a .venv with every dependency,
# created on first use and reused after (re-installed only when pyproject.toml changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean chromium

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedcxr demo

# The report test renders report.html in Debian's headless Chromium.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)

test: $(STAMP) chromium
	$(PY) -m pytest -q -p no:cacheprovider

chromium:
	@if [ -z "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && \
	    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "chromium missing and no root: the report rendering test will be skipped"; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check cli common server client tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/evaluator_speed.py

clean:
	rm -rf runs demo-cohort .pytest_cache
