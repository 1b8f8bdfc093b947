# joulegate — every target creates .venv when it is missing, so a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test hunt proto lint format bench bench-full clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/joulegate demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The property tests with fresh random seeds (CI replays fixed examples: JG_HYPOTHESIS_PROFILE=ci). A failure prints
# the command that reproduces it: the same seed over the same files, in the same order.
SEEDS ?= 4
PROPERTY_TESTS = $$(grep -rl --include='test_*.py' '@given' tests | sort)
hunt: $(STAMP)
	@for i in $$(seq 1 $(SEEDS)); do \
	  seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); echo "hunt: hypothesis seed $$seed"; \
	  $(PY) -m pytest -q -p no:cacheprovider -x --hypothesis-seed=$$seed $(PROPERTY_TESTS) || { \
	    echo "hunt: reproduce with: $(PY) -m pytest -q -p no:cacheprovider -x --hypothesis-seed=$$seed" $(PROPERTY_TESTS); \
	    exit 1; }; \
	done

proto: $(STAMP)
	$(PY) proto/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $$(ls -d app common proxy meter sim 2>/dev/null)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m bench.proxy_overhead --quick

clean:
	rm -rf $(VENV) .demo .bench *.egg-info
