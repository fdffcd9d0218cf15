# The two set-up commands of README.md:
#   make run   create .venv, install, run the whole pipeline on the embedded MNIST
#   make test  create .venv if needed, install, lint (ruff, hadolint) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gpu-mdf run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gpu_mdf tests scripts
	$(BIN)/hadolint Dockerfile.cuda

test: lint
	$(BIN)/pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
