# clickstream-dp — the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench bench-small clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clickdp demo --dir demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check pipelines transforms schemas tests

bench: $(STAMP)
	$(PY) -m pip install --quiet 'duckdb>=1.0'
	$(PY) bench/bench.py --name bench-10m --events 10000000 --users 1000000 --products 100000 --runs 3

bench-small: $(STAMP)
	$(PY) -m pip install --quiet 'duckdb>=1.0'
	$(PY) bench/bench.py --name bench-1m --events 1000000 --users 100000 --products 10000 --runs 3

clean:
	rm -rf $(VENV) demo .pytest_cache *.egg-info
