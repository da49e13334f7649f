"""mft_components/recipe_config/checks.py and the schema's bounds: `mft validate` names every bad setting, and `mft run`
stops at its first line with the same message, no traceback, writing nothing.

One tiny Llama directory (tests/tiny_models.py) with SmolLM2's tokenizer and two tasks; each case changes one
setting of a config that validates. Two more model directories (config.json without weights, an unknown
model_type) and a tokenizer without an EOS token.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil

import pytest
import torch
import yaml

import cli
from tests.conftest import file_tree
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("recipe_checks")
    model = make_tiny_model_dir(root / "model", family="llama", tokenizer_dir=smollm2_dir)
    for task in ("add", "upper"):
        (root / "data" / task).mkdir(parents=True)
        (root / "data" / task / "train.jsonl").write_text(
            "".join(json.dumps({"prompt": f"{task} {i}", "answer": str(i)}) + "\n" for i in range(4)))
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(model / "config.json", no_weights)
    unknown = root / "unknown_type"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()),
                                                     "model_type": "mystery_lm"}))
    os.symlink(model / "model.safetensors", unknown / "model.safetensors")
    no_eos = root / "no_eos_tokenizer"
    no_eos.mkdir()
    shutil.copy(model / "tokenizer.json", no_eos)
    (no_eos / "tokenizer_config.json").write_text(json.dumps({
        **json.loads((model / "tokenizer_config.json").read_text()), "eos_token": None}))
    (root / "a_file").write_text("not a directory")
    huge = root / "huge_header"  # a safetensors header claiming a 1 TB tensor, in a file of a few bytes
    huge.mkdir()
    shutil.copy(model / "config.json", huge)
    header = json.dumps({"lm_head.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 18], "data_offsets": [0, 1 << 40]}})
    header = header.encode() + b" " * (-len(header) % 8)
    (huge / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(root / "out"),
        "model": {"_component_": "mft_components.models.build_model", "model_dir": str(model),
                  "lora": {"rank": 4, "alpha": 8}, "attn_implementation": "sdpa_varlen"},
        "tokenizer": {"_component_": "mft_components.models.load_tokenizer", "path": str(model)},
        "data": {"_component_": "mft_components.data.build_mft_data", "seq_len": 64, "num_workers": 0,
                 "data_paths": [str(root / "data" / "add"), str(root / "data" / "upper")],
                 "cache_dir": str(root / "cache")},
        "loss": {"_component_": "mft_components.loss.TaskWeightedLoss", "mode": "task"},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},
        "max_steps": 2,
    }))
    return root


# (override, what the message must say): each is a setting that used to pass `mft validate` and then crash the
# run with a traceback, or train wrongly (clip_grad_norm -1 ascends; max_steps 0 ran a whole epoch).
BAD_SETTINGS = [
    ("clip_grad_norm=-1", "'clip_grad_norm' is -1: expected a positive number or null"),
    ("max_steps=0", "'max_steps' is 0: expected a positive integer or null"),
    ("max_steps=-5", "'max_steps' is -5: expected a positive integer or null"),
    ("epochs=0", "'epochs' is 0: expected a positive integer"),
    ("micro_batch_size=0", "'micro_batch_size' is 0: expected a positive integer"),
    ("micro_batch_size=-1", "'micro_batch_size' is -1: expected a positive integer"),
    ("gradient_accumulation_steps=0", "'gradient_accumulation_steps' is 0: expected a positive integer"),
    ("log_every_n_steps=0", "'log_every_n_steps' is 0: expected a positive integer"),
    ("optimizer.lr=fast", "'optimizer.lr' is 'fast': expected a non-negative number"),
    ("optimizer.lr=-0.1", "'optimizer.lr' is -0.1: expected a non-negative number"),
    ("optimizer.betas=[0.9,1.5]", "'optimizer': torch.optim.AdamW refuses these settings: Invalid beta parameter"),
    ("model.model_dir={root}/no_weights", "model.model_dir: {root}/no_weights: no model.safetensors"),
    ("model.model_dir={root}/unknown_type",
     "model.model_dir: {root}/unknown_type/config.json: model_type 'mystery_lm' is not an architecture transformers"),
    ("model.lora.rank=0", "model.lora.rank: expected a positive integer, got 0"),
    ("model.lora.rank=-4", "model.lora.rank: expected a positive integer, got -4"),
    ("model.lora.dropout=2.0", "model.lora.dropout: expected a probability in [0, 1), got 2.0"),
    ("model.lora.target_modules=[qproj]",
     "model.lora.target_modules: ['qproj'] matched no nn.Linear in the decoder layers of LlamaForCausalLM; "
     "linear names there: ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    ("tokenizer.path={root}/no_eos_tokenizer",
     "tokenizer {root}/no_eos_tokenizer: has no eos_token, which ends every assistant turn"),
    ("model.attn_implementation=flash",
     "model.attn_implementation: unknown 'flash'; expected auto or one of flex_attention, varlen_attn, "),
    ("model.attn_implementation=paged|eager",
     "model.attn_implementation: 'paged|eager' is a transformers attention mft cannot give packed-sample boundaries"),
    ("model.liger=[rms_norm,fast]",
     "model.liger: unknown kernels ['fast']; expected true or a list of ['rms_norm', 'swiglu', 'rope']"),
    ("model.compile=null", "'model.compile' is None: expected true or false or 'auto'"),
    ("eval.code=true", "'eval.code' is True: expected a mapping of its keys (tasks, num_samples, k, ...) or null"),
    ("loss.mode=tasks", "loss.mode: expected one of token, sample, task, task_sample, coba"),
    ("loss.task_weights.unit_tests=2", "loss.task_weights: unknown task(s) ['unit_tests']; the tasks are ['add', 'upper']"),
    ("loss.task_weights.add=-1", "loss.task_weights: expected non-negative weights, not all 0, got {'add': -1.0, "),
    ("loss.mode=coba data.valid_ratio=0",  # else CoBa kept its first weights for the whole run, saying nothing
     "loss.mode: coba weighs the tasks by their validation-loss curves, but data holds out no validation data"),
    ("output_dir={root}/a_file", "'output_dir' is '{root}/a_file': it is a file; expected a directory"),
    # issue 25: values that passed validate, then ran out of memory, trained NaN or crashed with a traceback
    ("model.lora.rank=100000", "model.lora.rank: 100000 is larger than every layer it adapts (down_proj 128->64, "
                               "gate_proj 64->128, k_proj 64->32, o_proj 64->64, q_proj 64->64, up_proj 64->128, "
                               "v_proj 64->32): an update of a layer has at most rank min(in, out); expected at most 64"),
    ("optimizer.lr=.inf", "'optimizer.lr' is inf: expected a finite number"),
    ("optimizer.weight_decay=.nan", "'optimizer.weight_decay' is nan: expected a finite number"),
    ("model.lora.alpha=1e308", "model.lora.alpha: 1e+308 gives a LoRA scale alpha / rank of 2.5e+307; expected a scale "
                               "up to 10000 (alpha is usually 1-2x the rank: rank 4, alpha 8)"),
    ("model.lora.alpha=strong", "'model.lora.alpha' is 'strong': expected a number"),
    ("model.model_dir={root}/huge_header", "model.model_dir: {root}/huge_header/model.safetensors: its header "
                                           "describes 1,099,511,627,776 bytes of tensors (1,099.5 GB), the file holds 64"),
    ("data.data_paths=null", "data.data_paths: expected a list of task directories or .jsonl files, got None"),
    ("output_dir={root}/a_file/run", "'output_dir' is '{root}/a_file/run': it is under {root}/a_file, a file"),
]


def test_the_base_config_is_valid(assets, capsys):
    assert cli.main(["validate", "--config", str(assets / "cfg.yaml")]) == 0, capsys.readouterr().err


def test_validate_reads_the_records_as_the_run_does(assets, tmp_path, capsys):
    """A bad record stops a run (on_bad_record: error) after the data build: validate reads the records too and
    names it with path:line: field; with skip it counts what the run will skip; --no-data checks the config only."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p"}\n')
    config = str(assets / "cfg.yaml")
    paths = f"data.data_paths=[{assets}/data/add,{bad}]"
    assert cli.main(["validate", "--config", config, paths]) == 1
    err = capsys.readouterr().err
    assert f"{bad / 'train.jsonl'}:2: " in err and "Traceback" not in err, err
    assert cli.main(["validate", "--config", config, paths, "data.on_bad_record=skip"]) == 0
    out = capsys.readouterr().out
    assert "OK for recipe lora_finetune_distributed (6 records read; 1 bad record(s) the run will skip" in out, out
    assert f"{bad / 'train.jsonl'}:2: " in out
    assert cli.main(["validate", "--config", config, paths, "--no-data"]) == 0
    assert "records not read: --no-data" in capsys.readouterr().out
    assert cli.main(["run", "lora_finetune_distributed", "--config", config, paths,
                     f"output_dir={tmp_path / 'out'}"]) == 1
    assert f"{bad / 'train.jsonl'}:2: " in capsys.readouterr().err


@pytest.mark.parametrize("override,message", BAD_SETTINGS, ids=[o.replace("{root}/", "") for o, _ in BAD_SETTINGS])
def test_validate_and_run_name_the_bad_setting(assets, capsys, override, message):
    override, message = override.replace("{root}", str(assets)), message.replace("{root}", str(assets))
    config = str(assets / "cfg.yaml")
    before = file_tree(assets)

    overrides = override.split(" ")
    # The problem is named by the override that set the value, not by the file that never held it.
    named = [f"{where}{o} (command line): {message}" for o in overrides for where in ("", f"{config} + ")]
    assert cli.main(["validate", "--config", config, *overrides]) == 1
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and any(n in err for n in named), err

    assert cli.main(["run", "lora_finetune_distributed", "--config", config, *overrides]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("config errors:\n") and any(n in err for n in named), err
    assert "Traceback" not in err and "trainable params" not in out  # stopped before any model was built

    assert file_tree(assets) == before  # no output_dir, no cache, the model and data untouched


def test_model_method_against_the_recipe(assets, capsys):
    """A full config run with the LoRA recipe (or the reverse) used to pass `mft validate` and stop after the data
    build; now both name model.method. Without --recipe, a renamed copy is checked against the recipe of its
    method."""
    config = str(assets / "cfg.yaml")
    assert cli.main(["validate", "--config", config, "model.method=full"]) == 0
    assert "OK for recipe full_finetune_distributed" in capsys.readouterr().out
    assert cli.main(["validate", "--config", config, "--recipe", "lora_finetune_distributed", "model.method=full"]) == 1
    assert ("'model.method' is 'full': lora_finetune_distributed trains lora or qlora; run full with "
            "full_finetune_distributed") in capsys.readouterr().err
    assert cli.main(["run", "full_finetune_distributed", "--config", config, "model.method=qlora"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("config errors:\n") and "'model.method' is 'qlora': full_finetune_distributed trains full" in err
    assert "trainable params" not in out


# Settings that are right for another machine (a GPU, more ranks): `mft validate` accepts them (a config is often checked where
# it does not run), and the run on this CPU stops before loading the model with the key and what to set instead.
DEVICE_SETTINGS = [
    ("model.attn_implementation=flex_attention",
     "model.attn_implementation: flex_attention trains on cuda only, this run is on cpu; use auto (here: sdpa_varlen)"),
    ("model.liger=true", "model.liger: liger-kernel's Triton kernels run on CUDA only, not cpu; set it to false"),
    ("loss.cross_entropy=liger",
     "loss.cross_entropy: liger runs on CUDA only (Triton kernels), this run is on cpu; use chunked"),
    ("model.cpu_offload=true",  # right for a multi-rank run; one rank would ignore it
     "model.cpu_offload: FSDP2 offloads the shards of a run on 2 or more ranks; this run has one, where it would do "
     "nothing; set it to false (on one GPU, method: qlora and activation_checkpointing save memory)"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="these settings run on CUDA: the test needs a CPU-only machine")
@pytest.mark.parametrize("override,message", DEVICE_SETTINGS, ids=[o for o, _ in DEVICE_SETTINGS])
def test_run_names_a_setting_this_device_cannot_do(assets, tmp_path, capsys, monkeypatch, override, message):
    config = str(assets / "cfg.yaml")
    if "cross_entropy" in override:  # installed or not, liger-kernel is not what stops a CPU run: pretend it is there
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                            if name == "liger_kernel" else find_spec(name, *a))
    assert cli.main(["validate", "--config", config, override]) == 0
    capsys.readouterr()
    assert cli.main(["run", "lora_finetune_distributed", "--config", config, override,
                     f"output_dir={tmp_path / 'out'}"]) == 1
    out, err = capsys.readouterr()
    assert err == f"config error: {message}\n" and "trainable params" not in out
