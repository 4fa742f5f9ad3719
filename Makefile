# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test test-fast test-nfs lint typecheck docs bench soak clean help

help:
	@echo "make run    create .venv, install, start the daemon on ./var/inbox"
	@echo "make test   create .venv, install with extras, run the test suite (what CI runs)"
	@echo "make test-fast  unit tests only: no daemons, containers, NFS or training (about a minute)"
	@echo "make typecheck  mypy over the package"
	@echo "make docs   regenerate docs/configuration.md's key table from config.HELP"
	@echo "make bench  throughput / latency / memory benchmark (writes bench-results/)"
	@echo "make soak   fault table and a 100k-file soak (writes bench-results/)"
	@echo "make lint   ruff"
	@echo "make test-nfs  two daemons on real NFS, 1,000 files, shared and per-host results (root; ~10 min)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Runtime only: LiteRT, no TensorFlow, so `make run` stays a small install.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	mkdir -p var/inbox
	$(BIN)/digitwatch watch --config config/digitwatch.toml

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not system" -q

typecheck: $(VENV)/.installed-test
	$(BIN)/python -m mypy digitwatch

docs: $(VENV)/.installed-test
	$(BIN)/python -m tests.docs_table --write

# Two hosts on real NFS (a User-Mode Linux guest, see tests/test_nfs.py):
# 1,000 files per run; `make test` runs the 100-file shared-results case.
test-nfs: $(VENV)/.installed-test
	DIGITWATCH_NFS_FILES=$${DIGITWATCH_NFS_FILES:-1000} DIGITWATCH_NFS_MODES=$${DIGITWATCH_NFS_MODES:-shared,per-host} \
	  $(BIN)/python -m pytest tests/test_nfs.py -v -s

lint: $(VENV)/.installed-test
	$(BIN)/ruff check digitwatch tests

bench: $(VENV)/.installed-test
	$(BIN)/python -m tests.bench.run --out bench-results

# Faults (SIGKILL loop, disk full, results deleted, inbox recreated) and a
# 100,000-file soak; about 15 minutes here. SOAK_ARGS to shorten.
soak: $(VENV)/.installed-test
	$(BIN)/python -m tests.bench.soak --out bench-results $(SOAK_ARGS)

clean:
	rm -rf $(VENV) var bench-results .pytest_cache
