"""`mft plot` and `mft runs compare` on real tiny runs (tests/test_recipes.py's model and tasks).

The reference is each run's metrics.jsonl: the plots' JSON sidecars must hold exactly its series, the PNGs must be
images matplotlib reads back, and the comparison's numbers must be the evaluations at each run's best step.
"""

from __future__ import annotations

import json

import pytest

from tests.test_recipes import LORA_RECIPE, _config, _records, _run, assets  # noqa: F401 - assets: a fixture

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def two_runs(assets, tmp_path_factory):
    """Two 4-step runs evaluated and saved every 2 steps, with different learning rates."""
    runs = []
    for name, lr in (("a", 1e-2), ("b", 3e-2)):
        root = tmp_path_factory.mktemp(f"run_{name}")
        cfg = _config(assets, root, eval_every_n_steps=2, save_every_n_steps=2, plots=True, **{"optimizer.lr": lr})
        _run(LORA_RECIPE, cfg)
        runs.append(root / "out")
    return runs


def _sidecar(run_dir, name):
    spec = json.loads((run_dir / "plots" / f"{name}.json").read_text())
    return {line["label"]: dict(zip(line["steps"], line["values"])) for line in spec["lines"]}


def test_a_run_ends_with_its_plots_one_figure_per_quantity_tasks_as_lines(two_runs):
    run_dir = two_runs[0]
    train, evals = _records(run_dir, "train"), _records(run_dir, "eval")
    assert {p.name for p in (run_dir / "plots").glob("*.png")} == {
        "train_loss.png", "val_loss.png", "lr.png", "tokens_per_s.png"}
    lines = _sidecar(run_dir, "train_loss")
    assert set(lines) == {"all tasks", "add", "upper"}
    assert lines["all tasks"] == pytest.approx({r["step"]: r["loss"] for r in train})
    assert lines["add"] == pytest.approx({r["step"]: r["loss/add"] for r in train if "loss/add" in r})
    val = _sidecar(run_dir, "val_loss")
    assert val["upper"] == pytest.approx({r["step"]: r["task_loss"]["upper"] for r in evals})
    assert _sidecar(run_dir, "lr")["lr"] == pytest.approx({r["step"]: r["lr"] for r in train})
    image = matplotlib.image.imread(run_dir / "plots" / "val_loss.png")
    assert image.shape[:2] == (450, 800)


def test_mft_plot_draws_pass_at_k_per_task(tmp_path, capsys):
    """A metrics.jsonl with code evaluations (the rows CodeEvaluator writes): one pass@k figure per k."""
    import cli

    rows = [{"kind": "train", "step": s, "loss": 2.0 / s, "loss/sql": 2.1 / s, "lr": 1e-3, "tokens_per_s": 100.0}
            for s in (1, 2)]
    rows += [{"kind": "code_eval", "step": s, "pass@1": 0.1 * s, "pass@5": 0.3 * s,
              "task_pass@1": {"sql": 0.2 * s, "pandas": 0.0}, "task_pass@5": {"sql": 0.4 * s, "pandas": 0.2},
              "task_problems": {"sql": 5, "pandas": 5}, "seconds": 1.0} for s in (0, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    assert cli.main(["plot", str(tmp_path), "--output", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in printed) == [
        "lr.png", "pass_at_1.png", "pass_at_5.png", "tokens_per_s.png", "train_loss.png"]
    spec = json.loads((tmp_path / "figs" / "pass_at_5.json").read_text())
    lines = {line["label"]: (line["steps"], pytest.approx(line["values"])) for line in spec["lines"]}
    assert lines == {"all tasks": ([0, 2], [0.0, 0.6]), "sql": ([0, 2], [0.0, 0.8]), "pandas": ([0, 2], [0.2, 0.2])}
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 1
    assert "metrics.jsonl: no such file" in capsys.readouterr().err


def test_runs_compare_prints_each_runs_best_checkpoint_per_task(two_runs, capsys):
    import cli

    a, b = two_runs
    assert cli.main(["runs", "compare", str(a), str(b), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name, run_dir in (("A", a), ("B", b)):
        evals = {r["step"]: r for r in _records(run_dir, "eval") if r["step"] in (2, 4)}  # the saved steps
        best = min(evals, key=lambda s: (evals[s]["loss"], s))
        assert result[name]["step"] == best and result[name]["checkpoint"].endswith(f"step_{best}")
        assert result[name]["tasks"]["val loss"] == pytest.approx(evals[best]["task_loss"])
    assert cli.main(["runs", "compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"A: {a}  best step {result['A']['step']} (loss ")
    row = next(line for line in table if line.startswith("add "))
    va, vb = result["A"]["tasks"]["val loss"]["add"], result["B"]["tasks"]["val loss"]["add"]
    assert row.split()[1:] == [f"{va:.4f}", f"{vb:.4f}", f"{vb - va:+.4f}"]
