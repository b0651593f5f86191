# The two commands: `make run` starts the service, `make test` runs the whole test suite.
# Each creates the virtual environment (.venv) and installs the exact, hash-checked versions in the lock
# files on first use, and again whenever a lock file changes. `make lock` regenerates the locks from the
# compatible ranges in requirements.txt and requirements-dev.txt.

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
PIP_INSTALL = $(VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes

# The locks are made by uv, installed into a throwaway virtual environment so nothing else needs it.
UV_VERSION ?= 0.13.9
# One lock for every platform (markers kept) from Python 3.11 up, with the hash of every file of each release.
LOCK_FLAGS = --universal --python-version 3.11 --generate-hashes --no-config --quiet --custom-compile-command "make lock"
# `make lock LOCK_ARGS=--upgrade` moves every pin to the newest release the ranges allow; without it the
# existing pins are kept wherever they still satisfy the ranges.
LOCK_ARGS ?=

.PHONY: run test lint lock migrate

run: $(VENV)/.runtime
	$(VENV)/bin/uvicorn main:app --host $(HOST) --port $(PORT)

# What the service does on start-up, as one command for deploy pipelines (see README, "Migrations").
migrate: $(VENV)/.runtime
	$(VENV)/bin/python -m migrations

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# ruff, then a check that the installed locks still satisfy the ranges (it fails after a range is
# edited without `make lock`): pip may not download anything, so any unmet range is an error.
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	@$(VENV)/bin/pip install --quiet --disable-pip-version-check --dry-run --no-index -r requirements-dev.txt \
		|| { echo "requirements*.lock no longer satisfy requirements*.txt: run make lock" >&2; exit 1; }

# The dev lock is compiled with the runtime lock as a constraint, so both pin the same runtime versions.
lock:
	tools="$$(mktemp -d)" && trap 'rm -rf "$$tools"' EXIT && \
	$(PYTHON) -m venv "$$tools" && \
	"$$tools/bin/pip" install --quiet --disable-pip-version-check uv==$(UV_VERSION) && \
	"$$tools/bin/uv" pip compile $(LOCK_FLAGS) $(LOCK_ARGS) requirements.txt -o requirements.lock && \
	"$$tools/bin/uv" pip compile $(LOCK_FLAGS) $(LOCK_ARGS) requirements-dev.txt -c requirements.lock \
		-o requirements-dev.lock

$(VENV)/.runtime: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.lock
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.lock
	$(PIP_INSTALL) -r requirements-dev.lock
	touch $@
