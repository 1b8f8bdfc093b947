# joulegate — every target creates .venv when it is missing, so a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test proto lint format bench bench-full clean

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
