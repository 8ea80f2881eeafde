# make run   set up (virtualenv, packages) and serve http://127.0.0.1:8000 with the built-in mock model
#            (Python only: the chat page is shipped built, in sse_gateway/static)
# make page  rebuild the chat page from templates/ after changing it (needs Node.js 20.19+ and npm)
# make test  set up everything the tests need (Python packages, Debian packages, npm packages) and run the suite
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

.PHONY: run test bench system-deps page page-tools clean

$(BIN)/python:
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || scripts/ensure-debian-packages.sh /usr/lib/python3/dist-packages/ensurepip:python3-venv
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	@touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@ $(VENV)/.installed-run

# The chat page's tools: npm packages from the lock file (only to change the page, and for the
# test that the committed build in sse_gateway/static is what templates/ builds to).
$(FRONTEND)/node_modules/.installed: $(FRONTEND)/package.json $(FRONTEND)/package-lock.json
	@command -v npm >/dev/null || { echo "Node.js 20.19+ with npm is needed to build the chat page" >&2; exit 1; }
	cd $(FRONTEND) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

page-tools: $(FRONTEND)/node_modules/.installed

# Rebuild the page into sse_gateway/static (committed with the change to templates/).
page: page-tools
	cd $(FRONTEND) && npm run build --silent

system-deps:
	@scripts/ensure-debian-packages.sh $(DEBIAN_TEST_PACKAGES)

run: $(VENV)/.installed-run
	$(BIN)/python sse_server.py --port=$(PORT) $(ARGS)

test: $(VENV)/.installed-test system-deps page-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test system-deps
	bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-artifacts $(FRONTEND)/node_modules
