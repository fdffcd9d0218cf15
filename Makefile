# The two set-up commands of README.md:
#   make run   create .venv, install, run the whole pipeline on the embedded MNIST
#   make test  create .venv if needed, install, lint (ruff, hadolint) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-lowest lint bench gpu-check clean

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

# The lowest versions that pyproject.toml allows (uv's lowest-direct resolution) in fresh
# venvs: the core + [convert] (Keras on JAX, no TensorFlow) with the engine, converter and
# command-line tests; the core + [train,mdf,plots] with the training, pipeline and interop
# tests. CI runs it after `make test`.
LOWEST := .venv-lowest
test-lowest: $(STAMP)
	scripts/test_lowest.sh $(LOWEST) convert "pytest pytest-timeout onnx onnxruntime modeci-mdf" \
	  tests/test_engine.py tests/test_ops.py tests/test_convert.py tests/test_interop.py tests/test_gpu_seam.py \
	  tests/test_data.py tests/test_inputs.py tests/test_io.py tests/test_cli.py tests/test_infer.py tests/test_bsonio.py
	$(LOWEST)/bin/python -c "import importlib.util as u; assert u.find_spec('tensorflow') is None, 'TensorFlow installed'"
	scripts/test_lowest.sh $(LOWEST)-train train,mdf,plots "pytest pytest-timeout playwright" \
	  tests/test_train.py tests/test_pipeline.py tests/test_convert.py tests/test_interop.py tests/test_engine.py

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(LOWEST) $(LOWEST)-train runs .pytest_cache .ruff_cache build dist
