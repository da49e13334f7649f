"""The `mft` command: ls, cp, run (in-process and under torchrun), validate, and packaging of built-ins."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cli
from mft_components.config import registry
from tests.conftest import REPO_ROOT

ECHO_RECIPE = REPO_ROOT / "tests" / "fixtures" / "echo_recipe.py"


def mft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", *args],
        capture_output=True, text=True, cwd=cwd or REPO_ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_help_lists_every_command():
    out = mft("--help").stdout
    for command in ("ls", "cp", "run", "validate", "data", "export", "generate", "import"):
        assert f"    {command}" in out


def test_ls_lists_recipes_with_their_configs(capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for recipe, configs in registry.RECIPE_CONFIGS.items():
        assert recipe in out
        for config in configs:
            assert (registry.configs_dir() / f"{config}.yaml").is_file(), f"built-in config {config} missing"
            assert config in out


def test_cp_config_and_recipe_without_clobbering(tmp_path, capsys):
    assert cli.main(["cp", "demo", str(tmp_path / "my_demo")]) == 0
    copied = tmp_path / "my_demo.yaml"
    assert copied.read_text() == (registry.configs_dir() / "demo.yaml").read_text()

    copied.write_text("edited")
    assert cli.main(["cp", "demo", str(copied)]) == 1
    assert "--force" in capsys.readouterr().err
    assert copied.read_text() == "edited"
    assert cli.main(["cp", "demo", str(copied), "--force"]) == 0
    assert copied.read_text() != "edited"

    assert cli.main(["cp", "lora_finetune_distributed", str(tmp_path)]) == 0
    assert (tmp_path / "lora_finetune_distributed.py").is_file()


def test_cp_needs_make_parents_for_missing_directories(tmp_path, capsys):
    dest = tmp_path / "a" / "b" / "cfg.yaml"
    assert cli.main(["cp", "demo", str(dest)]) == 1
    assert "--make-parents" in capsys.readouterr().err
    assert cli.main(["cp", "demo", str(dest), "--make-parents"]) == 0
    assert dest.is_file()


def test_cp_unknown_name(tmp_path, capsys):
    assert cli.main(["cp", "nope", str(tmp_path)]) == 1
    assert "no built-in recipe or config named 'nope'" in capsys.readouterr().err


def test_split_run_args_separates_torchrun_flags_config_and_overrides():
    recipe, config, launcher, overrides = cli.split_run_args(
        ["--nproc-per-node", "2", "my.py", "--config", "c.yaml", "--standalone", "a.b=1", "~c", "--nnodes=1", "x=y=z"]
    )
    assert recipe == "my.py" and config == "c.yaml"
    assert launcher == ["--nproc-per-node", "2", "--standalone", "--nnodes=1"]
    assert overrides == ["a.b=1", "~c", "x=y=z"]
    with pytest.raises(SystemExit, match="unknown option '--bogus'"):
        cli.split_run_args(["r.py", "--bogus", "1"])


def test_run_in_process(tmp_path):
    config = tmp_path / "echo.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmessage: hi\n")
    assert cli.main(["run", str(ECHO_RECIPE), "--config", str(config), "repeat=3"]) == 0
    assert json.loads((tmp_path / "out" / "rank0.json").read_text()) == {"message": "hihihi", "world": 1, "world_sum": 1}


def test_run_reports_config_errors_with_exit_status(tmp_path):
    config = tmp_path / "echo.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmesage: hi\n")
    proc = mft("run", str(ECHO_RECIPE), "--config", str(config))
    assert proc.returncode == 1
    assert "unknown key 'mesage' (did you mean 'message'?)" in proc.stderr


def test_run_under_torchrun_with_two_processes(tmp_path):
    config = tmp_path / "echo.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n")
    proc = mft("run", "--nproc-per-node", "2", "--standalone", str(ECHO_RECIPE), "--config", str(config), "message=yo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) == {"message": "yo", "world": 2, "world_sum": 3}


def test_validate_reports_every_problem_at_once(tmp_path):
    config = tmp_path / "echo.yaml"
    config.write_text("mesage: hi\nrepeat: many\n")
    proc = mft("validate", "--config", str(config), "--recipe", str(ECHO_RECIPE))
    assert proc.returncode == 1
    assert "3 problem(s)" in proc.stderr
    assert "unknown key 'mesage' (did you mean 'message'?)" in proc.stderr
    assert "'repeat' is 'many': expected an integer" in proc.stderr
    assert "missing required key 'output_dir'" in proc.stderr
    ok = mft("validate", "--config", str(config), "--recipe", str(ECHO_RECIPE), "~mesage", "repeat=2", "output_dir=o")
    assert ok.returncode == 0, ok.stderr


def test_errors_in_command_line_overrides_name_the_override_not_the_file(tmp_path, capsys):
    config = tmp_path / "echo.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmessage: hi\n")
    assert cli.main(["validate", "--config", str(config), "--recipe", str(ECHO_RECIPE), "repeat=many",
                     "mesage=x", "~output_dir"]) == 1
    err = capsys.readouterr().err
    assert "repeat=many (command line): 'repeat' is 'many': expected an integer" in err
    assert "mesage=x (command line): unknown key 'mesage' (did you mean 'message'?)" in err
    assert "~output_dir (command line): missing required key 'output_dir'" in err
    assert f"{config}: " not in err.replace(f"problem(s) in {config}", "")
    # The run itself says the same; a mistake in the file still names the file.
    assert cli.main(["run", str(ECHO_RECIPE), "--config", str(config), "repeat=many"]) == 1
    assert "repeat=many (command line): 'repeat' is 'many'" in capsys.readouterr().err
    config.write_text(f"output_dir: {tmp_path / 'out'}\nrepeat: many\n")
    assert cli.main(["run", str(ECHO_RECIPE), "--config", str(config), "message=hi"]) == 1
    assert f"{config}: 'repeat' is 'many'" in capsys.readouterr().err


def test_run_help_lists_the_recipes_config_keys(capsys):
    import dataclasses

    from mft_components.recipe_config.schema import LoRARecipeConfig

    assert cli.main(["run", str(ECHO_RECIPE), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mft run RECIPE --config CONFIG")
    assert "  output_dir   str  (required)\n  message      str  (default: hello)\n  repeat       int  (default: 1)\n" in out
    assert cli.main(["run", "lora_finetune_distributed", "--help"]) == 0
    out = capsys.readouterr().out
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert [f.name for f in dataclasses.fields(LoRARecipeConfig)] == [k for k in keys if "." not in k]
    # Sections list their builder's arguments, with the builder's documentation.
    assert "  data.seq_len" in out and "int  (default: 2048)\n      row length" in out
    assert "lr_scheduler.warmup_steps" in out and "eval.code.num_samples" in out and "model.lora " in out
    assert re.search(r"\n  max_steps +int \| None \(>= 1\)  \(default: null\)\n      stop after", out)


@pytest.mark.parametrize("command", ["export", "eval", "generate", "init", "import"])
def test_command_help_imports_no_torch(command):
    """`mft export --help` (and eval, generate) answer at once: their arguments live in modules without torch."""
    script = ("import sys, cli\n"
              "try:\n"
              f"    cli.main([{command!r}, '--help'])\n"
              "except SystemExit as e:\n"
              "    assert e.code == 0\n"
              "print('heavy:', sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: " in proc.stdout and "--help" in proc.stdout and "heavy: []" in proc.stdout


def test_light_argument_modules_agree_with_the_code_they_describe():
    from mft_components.inference.export_args import OUTPUT_DTYPE_NAMES
    from mft_components.inference.shards import OUTPUT_DTYPES

    assert OUTPUT_DTYPE_NAMES == tuple(OUTPUT_DTYPES)


def test_copied_recipes_import_their_copied_siblings(tmp_path, capsys, monkeypatch):
    """full_finetune_distributed's docstring: copy both recipes, import the loop from the LoRA copy; `mft validate`
    and `mft run` (one rank, in this process) load the copy, as `python` and torchrun would."""
    assert cli.main(["cp", "lora_finetune_distributed", str(tmp_path)]) == 0
    assert cli.main(["cp", "full_finetune_distributed", str(tmp_path)]) == 0
    full = tmp_path / "full_finetune_distributed.py"
    original = "from mft_recipes.lora_finetune_distributed import LoRAFinetuneRecipe, run"
    assert original in full.read_text()
    full.write_text(full.read_text().replace(original, "from lora_finetune_distributed import LoRAFinetuneRecipe, run"))
    monkeypatch.delitem(sys.modules, "lora_finetune_distributed", raising=False)
    schema = cli.recipe_schema(full)
    assert schema is not None and Path(sys.modules["lora_finetune_distributed"].__file__) == tmp_path / (
        "lora_finetune_distributed.py")
    assert str(tmp_path) not in sys.path
    config = tmp_path / "bad.yaml"
    config.write_text("max_steps: 0\n")
    assert cli.main(["run", str(full), "--config", str(config)]) == 1  # loaded, then stopped by the config check
    assert "'max_steps' is 0" in capsys.readouterr().err


def test_builtin_configs_validate_against_their_recipes():
    for recipe, configs in registry.RECIPE_CONFIGS.items():
        schema = cli.recipe_schema(registry.resolve_recipe(recipe))
        assert schema is not None, f"{recipe} declares no CONFIG_SCHEMA"
        for name in configs:
            from mft_components.config import check_config, load_config

            problems = check_config(load_config(name), schema)
            # Model and data paths are placeholders the user sets; everything else must be right.
            problems = [p for p in problems if "path does not exist" not in p]
            assert problems == [], f"{name}: {problems}"


def test_wheel_ships_recipes_configs_and_cli(tmp_path):
    """A normal (non-editable) install finds built-ins by name: they must be inside the wheel. Built from a copy of
    the sources: setuptools' build/ directory in the checkout keeps what earlier builds put there."""
    src = tmp_path / "src"
    for name in ("mft_components", "recipes", "configs"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(REPO_ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("mft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cli.py" in names
    # every module of the library, subpackages too (the recipe imports mft_components.code_eval)
    modules = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "mft_components").rglob("*.py")}
    assert modules - names == set()
    for recipe in registry.RECIPE_CONFIGS:
        assert f"mft_recipes/{recipe}.py" in names
    for configs in registry.RECIPE_CONFIGS.values():
        for config in configs:
            assert f"mft_configs/{config}.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mft = cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
