# The two commands of the README, each doing its own set-up on a fresh machine:
#   make reproduce   # set up, run the default comparison (the tiny suite) with Snakemake, then compare its
#                    # scores with the published ones (results/tiny): exit 1 if they differ
#   make test        # set up, then run the test suite
# and the deliberate one:
#   make publish     # copy work/<suite>/leaderboard into results/<suite> and regenerate the README's table
# constraints.txt pins every other library to the versions the published results were made with.
# TORCH_SPEC pins torch first, so pip takes the local CPU wheel where one exists instead of a multi-GB
# CUDA build; on a GPU machine the same pin installs the CUDA build from PyPI.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SUITE ?= config/tiny.yaml
CORES ?= all
BIN := $(VENV)/bin

.PHONY: setup reproduce publish check test bench clean-work

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,trl]" -c constraints.txt
	touch $@

setup: $(VENV)/.installed

reproduce: setup
	$(BIN)/snakemake --cores $(CORES) --configfile $(SUITE)
	$(BIN)/python -m harness.cli check --config $(SUITE)

publish: setup
	$(BIN)/python -m harness.cli publish --config $(SUITE)

check: setup
	$(BIN)/python -m harness.cli check --config $(SUITE)

test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile

bench: setup
	$(BIN)/python -m harness.bench objectives

clean-work:
	rm -rf work .snakemake
