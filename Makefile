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

# --- Airflow DAG check (not part of `make test`: installing Airflow takes ~10 minutes) ---
# Builds its own environment, loads deploy/airflow/clickdp_nightly_dag.py with a real Airflow
# (DagBag) and checks it; see deploy/airflow/check_dag.py. The Beam provider 6.3.1 needs the
# Google provider even to construct its operators under Airflow 3, hence providers-google.
AIRFLOW_VENV     ?= .venv-airflow
AIRFLOW_VERSION  ?= 3.3.2
AIRFLOW_PACKAGES ?= 'apache-airflow==$(AIRFLOW_VERSION)' \
                    'apache-airflow-providers-apache-beam[google]==6.3.1' \
                    'apache-airflow-providers-google==22.8.0'
AIRFLOW_STAMP    := $(AIRFLOW_VENV)/.installed-$(AIRFLOW_VERSION)

.PHONY: airflow-check airflow-clean

$(AIRFLOW_STAMP):
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet $(AIRFLOW_PACKAGES)
	touch $(AIRFLOW_STAMP)

airflow-check: $(AIRFLOW_STAMP) $(STAMP)
	$(AIRFLOW_VENV)/bin/python deploy/airflow/check_dag.py --clickdp-python $(PY)

airflow-clean:
	rm -rf $(AIRFLOW_VENV)
