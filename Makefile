# fieldlink: the two commands are `make demo` and `make test` (see README.md).
# Both work on a fresh Debian machine as root: they create .venv and install what they need.

VENV     ?= .venv
PYTHON   ?= python3
BIN      := $(VENV)/bin
DURATION ?=
# Debian packages the tests talk to (real servers, never mocks).
TEST_DEBS := mosquitto victoria-metrics openssl mbpoll systemd chromium
# The dashboard page's MQTT client: MQTT.js from npm (pinned in web/package-lock.json), its browser
# bundle copied next to the page (gitignored), where fieldlink-cloud serves it (docs/web-dashboard.md).
WEB_BUNDLE := cloud/web/static/vendor/mqtt.min.js

.PHONY: demo test web lint format install debian-test-deps clean chaos bench-replay bench-live bench-acquisition bench-ingest bench-alerts

demo: $(VENV)/.installed web
	@$(BIN)/firmware-sim demo $(if $(DURATION),--duration $(DURATION))

test: $(VENV)/.installed debian-test-deps web
	$(BIN)/ruff check .
	$(BIN)/pytest

# Long runs, not part of `make test`: a randomized fault campaign and the benchmarks.
# Each prints its figures; the last line is the one to quote.
chaos: $(VENV)/.installed debian-test-deps
	$(BIN)/python -m tests.chaos $(if $(DURATION),--duration $(DURATION)) $(if $(SEED),--seed $(SEED))

bench-replay: $(VENV)/.installed debian-test-deps
	$(BIN)/python -m bench.replay

bench-live: $(VENV)/.installed debian-test-deps
	$(BIN)/python -m bench.live

bench-acquisition: $(VENV)/.installed debian-test-deps
	$(BIN)/python -m bench.acquisition

bench-ingest: $(VENV)/.installed debian-test-deps
	$(BIN)/python -m bench.ingest

bench-alerts: $(VENV)/.installed debian-test-deps
	$(BIN)/python -m bench.alerts

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

install: $(VENV)/.installed

web: $(WEB_BUNDLE)

$(WEB_BUNDLE): web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo "make web: npm not found; install Node.js and npm (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix web --ignore-scripts --no-audit --no-fund
	@mkdir -p $(@D)
	cp web/node_modules/mqtt/dist/mqtt.min.js $@

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed; installing Debian's python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,sim]'
	@touch $@

debian-test-deps:
	@missing=""; \
	for pkg in $(TEST_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .hypothesis *.egg-info web/node_modules $(dir $(WEB_BUNDLE))
