# The two commands of the README, each doing its own set-up on a fresh machine:
#   make reproduce   # set up, then run the default comparison (the tiny suite) with Snakemake
#   make test        # set up, then run the test suite
# TORCH_SPEC pins torch first, so pip takes the local CPU wheel where one exists instead of a multi-GB
# CUDA build; on a GPU machine the same pin installs the CUDA build from PyPI.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SUITE ?= config/tiny.yaml
CORES ?= all
BIN := $(VENV)/bin

.PHONY: setup reproduce test bench clean-work

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,trl]"
	touch $@

setup: $(VENV)/.installed

reproduce: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile $(SUITE)

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m harness.bench objectives

clean-work:
	rm -rf work .snakemake
