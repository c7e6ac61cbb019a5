# Two commands on a fresh machine: `make demo` and `make test`. Each sets up its own
# virtualenv. torch is installed first from its exact CPU pin: a looser resolve would
# pull several GB of CUDA wheels. Everything else is pinned by constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint format bench bench-quality bench-anomaly bench-temporal \
	bench-synthesis serve clean

# Each step says what it installs first: the torch wheel alone takes minutes on a
# slow link, and pip -q is silent meanwhile.
$(STAMP): pyproject.toml constraints.txt
	@echo "latentflow: creating the virtualenv $(VENV) (if missing)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "latentflow: upgrading pip"
	$(PY) -m pip install -q --upgrade pip
	@echo "latentflow: installing torch 2.13.0, CPU build (the largest download: minutes on a slow link)"
	$(PY) -m pip install -q --progress-bar on torch==2.13.0
	@echo "latentflow: installing latentflow and its pinned dependencies (constraints.txt: Prefect, MLflow, pandas, ...)"
	$(PY) -m pip install -q --progress-bar on -c constraints.txt -e ".[dev]"
	touch $(STAMP)
	@echo "latentflow: installed into $(VENV)"

install: $(STAMP)

demo: install
	@echo "latentflow: running the pipeline on 20,000 generated rows into .demo/"
	$(VENV)/bin/latentflow demo --data-dir .demo

test: install
	@echo "latentflow: running the test suite (about 30 min on 2 cores)"
	$(PY) -m pytest -q --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m benchmarks.run

bench-quality: install
	$(PY) -m benchmarks.quality

# Real anomaly data sets from ../shared/data/anomaly (skips when absent).
bench-anomaly: install
	$(PY) -m benchmarks.anomaly

# kind sequence on weatherAUS with planted temporal anomalies (skips when absent).
bench-temporal: install
	$(PY) -m benchmarks.temporal

# GAN vs VAE vs independent columns on ../shared/data/weatherAUS.csv (skips when absent).
bench-synthesis: install
	$(PY) -m benchmarks.synthesis

# Prefect server + scheduled deployments + MLflow UI, all on 127.0.0.1; Ctrl-C stops all.
serve: install
	$(PY) -m deployments.serve $(SERVE_ARGS)

clean:
	rm -rf .demo benchmarks/results
