# make run   set up (virtualenv, packages) and serve http://127.0.0.1:8000 with the built-in mock model
# make test  set up everything the tests need (Python packages, Debian packages) and run the suite
# make bench the gateway beside its peers, memory store and Redis (bench/run.sh; needs ../shared/bench)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=
# command:package pairs the tests need from Debian (installed only when missing)
# (Playwright drives Debian's Chromium: it cannot download a browser of its own here.)
DEBIAN_TEST_PACKAGES := curl:curl chromium:chromium redis-server:redis-server nginx:nginx

FRONTEND := templates
PAGE_SOURCES := $(FRONTEND)/index.html $(FRONTEND)/vite.config.js $(wildcard $(FRONTEND)/src/*)

.PHONY: run test bench system-deps frontend clean

$(BIN)/python:
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || scripts/ensure-debian-packages.sh /usr/lib/python3/dist-packages/ensurepip:python3-venv
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	@touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@ $(VENV)/.installed-run

# The chat page: npm packages from the lock file, then a Vite build into templates/static.
$(FRONTEND)/node_modules/.installed: $(FRONTEND)/package.json $(FRONTEND)/package-lock.json
	@command -v npm >/dev/null || { echo "Node.js 20.19+ with npm is needed to build the chat page" >&2; exit 1; }
	cd $(FRONTEND) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(FRONTEND)/static/index.html: $(FRONTEND)/node_modules/.installed $(PAGE_SOURCES)
	cd $(FRONTEND) && npm run build --silent

frontend: $(FRONTEND)/static/index.html

system-deps:
	@scripts/ensure-debian-packages.sh $(DEBIAN_TEST_PACKAGES)

run: $(VENV)/.installed-run frontend
	$(BIN)/python sse_server.py --port=$(PORT) $(ARGS)

test: $(VENV)/.installed-test system-deps frontend
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test system-deps
	bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-artifacts $(FRONTEND)/node_modules $(FRONTEND)/static
