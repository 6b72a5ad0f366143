# Two entry points: `make run` (a pool serving, visibly) and `make test` (the whole suite).
# Both create .venv on first use. Needs python3 >= 3.11 with venv (Debian: python3-venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test fuzz venv clean bench typecheck

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "asyncmsgr needs Python >= 3.11, found " + sys.version.split()[0])'
	@$(PY) -m venv $(VENV) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv && $(PY) -m venv $(VENV); \
	  else echo "python3 -m venv failed: install your distribution's venv package (Debian: apt-get install python3-venv)"; exit 1; fi; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/msgr demo

# The whole suite on the compiled per-message path, then the protocol tests again on the
# pure-Python one (the reference; the differential tests compare the two).
test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest
	ASYNCMSGR_NO_EXTENSIONS=1 HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q tests/protocol \
	  --ignore=tests/protocol/test_accel.py --ignore=tests/protocol/test_accel_fuzz.py

# Random exploration: new seeds every run, 20x the examples, only the property tests.
# A failure it finds is replayed first next time (.hypothesis/fuzz); keep it as an @example.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest --timeout 1200 \
	  tests/protocol tests/test_fuzz.py tests/transport/test_memif_wire.py

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/msgr bench tcp --json bench-tcp.json

typecheck: $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m mypy protocol transport pool tools

clean:
	rm -rf $(VENV) build *.egg-info
