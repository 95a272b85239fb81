# One verb each. `make run` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_PORT ?= 8090
# Test worker processes: most of the suite waits on brokers, JVMs and child processes, not on the CPU.
# Each test file runs whole on one worker (its module fixtures and brokers are started once).
TEST_JOBS ?= 2

.PHONY: install run test test-fast lint bench clean

$(STAMP): pyproject.toml devtools/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "installing Relais, its development tools (devtools/: local Kafka, demo target) and test tools into $(VENV) ..."
	@$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./devtools
	@touch $@

# The validator's hot modules compiled by mypyc (services/validator/native.py); rebuilt when they change. Without
# a C compiler the validator runs as plain Python, with the same findings (about 1.8x slower).
NATIVE := services/validator/_native/STAMP

$(NATIVE): $(STAMP) $(wildcard services/validator/*.py) services/core/outcome.py
	@echo "compiling the validator's hot modules with mypyc (a minute or two) ..."
	@$(BIN)/python -m services.validator.native >/dev/null \
	  || echo "the validator could not be compiled (a C compiler and Python's headers are needed): it runs as plain Python"

install: $(STAMP) $(NATIVE)  ## create .venv with Relais, its development tools (devtools/) and test tools

run: $(STAMP) $(NATIVE)  ## every stage in one process (embedded bus), a demo target, demo credentials
	RELAIS_PRODUCERS_FILE=$${RELAIS_PRODUCERS_FILE:-deploy/dev/producers.yaml} \
	RELAIS_TARGETS_FILE=$${RELAIS_TARGETS_FILE:-deploy/dev/targets.yaml} \
	RELAIS_OPERATORS_FILE=$${RELAIS_OPERATORS_FILE:-deploy/dev/operators.yaml} \
	$(BIN)/relais run --demo-target --demo-target-port $(DEMO_PORT)

MEDPLUM := tests/medplum/node_modules/.installed

$(MEDPLUM): tests/medplum/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  echo "installing Medplum (the real FHIR server of the e2e tests) from tests/medplum/package-lock.json ..."; \
	  (cd tests/medplum && npm ci --no-audit --no-fund --loglevel=error) && touch $@; \
	else echo "npm not found: the Medplum end-to-end tests will skip (they fail in CI)"; fi

test: $(STAMP) $(NATIVE) $(MEDPLUM)  ## the whole suite: unit, integration (real Kafka), end to end (processes)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only: no network, seconds
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check services devtools tests
	$(BIN)/mypy

bench: $(STAMP)  ## benchmarks (not tests): prints throughput and latency figures
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info relais-ledger.db*
