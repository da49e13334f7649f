"""Recipes and configs from before the layered layout keep working (mft_components/legacy/ and the package faces).

* tests/fixtures/legacy_lora_recipe.py is recipes/lora_finetune_distributed.py as `mft cp` copied it before the
  layout changed: it imports old module names (mft_components.checkpoint, .metrics, .lora, .recipe_schema,
  .sampling), calls MFTData.train_loader and imports gather_state_dict from mft_components.distributed. It trains as
  the new recipe does, to the same weights, and the deprecations are reported.
* tests/fixtures/legacy_demo.yaml is configs/demo.yaml from before: its `_component_` paths, including
  mft_components.lr_schedule.cosine_with_warmup, still build, with the new recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mft_components.training import checkpoint as ck
from tests.conftest import REPO_ROOT
from tests.test_recipes import LORA_RECIPE, _config, _records, _run, _write_tasks
from tests.tiny_models import make_tiny_model_dir

LEGACY_RECIPE = REPO_ROOT / "tests" / "fixtures" / "legacy_lora_recipe.py"
LEGACY_DEMO = REPO_ROOT / "tests" / "fixtures" / "legacy_demo.yaml"
OLD_SCHEDULE = "mft_components.lr_schedule.cosine_with_warmup"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("legacy_assets")
    model_dir = make_tiny_model_dir(root / "model", family="llama", tokenizer_dir=smollm2_dir)
    return {"model_dir": str(model_dir), "data_paths": _write_tasks(root / "data"), "root": root}


def _mft_run(recipe, config, *overrides: str) -> subprocess.CompletedProcess:
    """`mft run RECIPE --config CONFIG ...` in a fresh interpreter (one rank), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run", str(recipe), "--config", str(config),
         *overrides],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_recipe_copied_before_the_layout_trains_like_the_new_one(assets, tmp_path):
    """The old recipe, on an old-style config (the old lr_scheduler path), trains 2 steps and saves a checkpoint;
    every moved module says where it went; and the new recipe on the same config reaches the same weights and
    losses, bit for bit (dropout on: the RNG goes the same way too)."""
    config = _config(assets, tmp_path, max_steps=2, **{"lr_scheduler._component_": OLD_SCHEDULE,
                                                       "model.lora.dropout": 0.1})
    old = _mft_run(LEGACY_RECIPE, config, f"output_dir={tmp_path / 'old'}")
    assert old.returncode == 0, old.stderr[-6000:]
    for module, new in (("checkpoint", "training.checkpoint"), ("metrics", "training"), ("lora", "models.lora"),
                        ("recipe_schema", "recipe_config.schema"), ("sampling", "data.sampling"),
                        ("lr_schedule", "training.lr_schedule")):
        assert f"DeprecationWarning: mft_components.{module} moved to mft_components.{new}" in old.stderr, module
    assert "mft_components.data.MFTData.train_loader(...) is deprecated" in old.stderr
    assert [r["step"] for r in _records(tmp_path / "old", "train")] == [1, 2]
    ck.verify_checkpoint(tmp_path / "old" / "step_2", resumable=True)

    new = _mft_run("lora_finetune_distributed", config, f"output_dir={tmp_path / 'new'}")
    assert new.returncode == 0, new.stderr[-6000:]
    assert "mft_components.lr_schedule moved to mft_components.training.lr_schedule" in new.stderr
    assert "moved to" not in new.stderr.replace("mft_components.lr_schedule moved to", "")  # the config's only
    a = ck.load_checkpoint_weights(tmp_path / "old" / "step_2")
    b = ck.load_checkpoint_weights(tmp_path / "new" / "step_2")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    losses = {run: [r["loss"] for r in _records(tmp_path / run, "train")] for run in ("old", "new")}
    assert losses["new"] == losses["old"]
    assert _records(tmp_path / "new", "eval") == _records(tmp_path / "old", "eval")


def test_config_from_before_the_layout_runs_with_the_new_recipe(assets, tmp_path, monkeypatch):
    """configs/demo.yaml as it was, pointed at the tiny model and tasks: every `_component_` path of it resolves
    (the models, data and loss faces; the lr_schedule shim, which says where it went) and the new recipe trains."""
    monkeypatch.delitem(sys.modules, "mft_components.lr_schedule", raising=False)  # its warning comes at import
    data_paths = "[" + ",".join(assets["data_paths"]) + "]"
    with pytest.warns(DeprecationWarning, match="mft_components.lr_schedule moved to mft_components.training"):
        _run(LORA_RECIPE, LEGACY_DEMO, f"output_dir={tmp_path / 'out'}", f"model.model_dir={assets['model_dir']}",
             f"data.data_paths={data_paths}", "data.seq_len=64", "max_steps=2", "~eval")
    out = tmp_path / "out"
    assert [r["step"] for r in _records(out, "train")] == [1, 2]
    meta = ck.verify_checkpoint(out / "step_2", resumable=True)
    assert meta["task_names"] == ["add", "upper"] and meta["method"] == "lora"
    assert meta["config"]["lr_scheduler"]["_component_"] == OLD_SCHEDULE
    assert json.loads((out / "step_2" / "adapter_config.json").read_text())["r"] == 16
