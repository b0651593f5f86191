# The two commands: `make run` starts the service, `make test` runs the whole test suite.
# Each creates the virtual environment (.venv) and installs what it needs on first use.

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint

run: $(VENV)/.runtime
	$(VENV)/bin/uvicorn main:app --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@
