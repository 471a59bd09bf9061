# `make demo` and `make test` do all set-up themselves: a .venv with every dependency,
# created on first use and reused after (re-installed only when pyproject.toml changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean system-packages

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedcxr demo

# Servers and programs the tests use, from Debian's packages: headless Chromium renders
# report.html; nginx is the SuperLink's reverse proxy (deploy/proxy, tests/e2e/test_proxy.py).
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)
NGINX := $(shell command -v nginx || ls /usr/sbin/nginx 2>/dev/null)
DEBS := $(if $(CHROMIUM),,chromium) $(if $(NGINX),,nginx-light)
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

test: $(STAMP) system-packages
	$(PY) -m pytest -q -p no:cacheprovider

system-packages:
	@if [ -n "$(strip $(DEBS))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(APT) $(DEBS); \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo $(APT) $(DEBS); \
	  else echo "$(DEBS) missing and no root: the tests that need them are skipped"; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check cli common server client tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/evaluator_speed.py

clean:
	rm -rf runs demo-cohort .pytest_cache
