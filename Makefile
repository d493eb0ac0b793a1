# The two commands of the README:
#   make study   install everything into .venv (first time) and run the default study
#   make test    install everything into .venv (first time) and run the tests
PYTHON ?= python3.11
VENV   ?= .venv
CORES  ?= 2
BIN     = $(VENV)/bin

.PHONY: study test env lint clean-study

$(BIN)/finetail: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

env: $(BIN)/finetail

study: env
	$(BIN)/snakemake --cores $(CORES)

test: env
	$(BIN)/snakemake --lint
	$(BIN)/python -m pytest -ra

lint: env
	$(BIN)/snakemake --lint

clean-study:
	rm -rf results/default logs/default
