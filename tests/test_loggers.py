"""Metric loggers (mft_components/training/loggers.py) with the real libraries, offline.

W&B runs offline and its transaction log is read back with wandb's own reader (``wandb leet inspect --json``);
MLflow writes a local SQLite store (and, in a slow test, a ``mlflow server`` started here on 127.0.0.1) read back
with ``MlflowClient``. The reference is the run's own metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mft_components.training.loggers import ExternalLoggers, flatten_metrics, metric_logger_problems
from tests.test_recipes import LORA_RECIPE, _config, _records, _run, assets  # noqa: F401 - assets: a fixture

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

WANDB_CLI = Path(sys.executable).with_name("wandb")


def _wandb_records(run_file: Path) -> list[dict]:
    out = subprocess.run([str(WANDB_CLI), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                         text=True, check=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _wandb_history(run_file: Path) -> dict[int, dict]:
    """step -> the values logged at it, from the run's transaction log."""
    history = {}
    for record in _wandb_records(run_file):
        if record["type"] == "history":
            item = record["history"]["item"]
            history.setdefault(int(item["_step"]), {}).update(item)
    return history


def _mlflow_history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_flatten_metrics_gives_each_task_its_own_series():
    assert flatten_metrics("train", {"loss": 1.5, "loss/add": 1.0, "lr": 1e-3, "epoch": 0}) == {
        "train/loss": 1.5, "train/loss/add": 1.0, "train/lr": 1e-3, "train/epoch": 0.0}
    assert flatten_metrics("eval", {"loss": 2.0, "task_loss": {"add": 1.0}, "task_perplexity": {"add": 2.7},
                                    "best_step": None}) == {
        "val/loss": 2.0, "val/loss/add": 1.0, "val/perplexity/add": 2.7}
    assert flatten_metrics("code_eval", {"pass@1": 0.5, "task_pass@1": {"add": 0.25}}) == {
        "code_eval/pass@1": 0.5, "code_eval/pass@1/add": 0.25}


def test_wandb_and_mlflow_get_every_series_and_a_resume_continues_the_same_runs(assets, tmp_path, monkeypatch,
                                                                                 capsys):
    """Two steps, then a resume to four: one W&B run id and one MLflow run, holding what metrics.jsonl holds; the
    best checkpoint as a W&B artifact (asked for)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "out"
    cfg = _config(assets, tmp_path, max_steps=2, eval_every_n_steps=2, save_every_n_steps=2,
                  metric_loggers=[{"_component_": "mft_components.training.loggers.WandBLogger",
                                   "log_artifact": True}, "mlflow"])
    _run(LORA_RECIPE, cfg)
    assert "wandb has no API key" in capsys.readouterr().err  # offline, and says so
    _run(LORA_RECIPE, cfg, "max_steps=4", "resume=auto")

    train, evals = _records(out, "train"), _records(out, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4]

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mft").experiment_id])
    assert len(runs) == 1, "the resume continued the run instead of starting a second one"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.01" and run.data.params["max_steps"] == "2"
    assert _mlflow_history(client, run.info.run_id, "train/loss/add") == pytest.approx(
        {r["step"]: r["loss/add"] for r in train if "loss/add" in r})
    assert _mlflow_history(client, run.info.run_id, "train/lr") == pytest.approx({r["step"]: r["lr"] for r in train})
    assert _mlflow_history(client, run.info.run_id, "val/loss/upper") == pytest.approx(
        {r["step"]: r["task_loss"]["upper"] for r in evals})
    assert run.data.metrics["summary/steps"] == 4 and run.data.tags["summary.stop_reason"] == "reached 4 steps"

    run_files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and run_files[0].name == run_files[1].name  # the same run id, continued
    history = {**_wandb_history(run_files[0]), **_wandb_history(run_files[1])}
    for r in train:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"])
        assert history[r["step"]]["train/tokens_per_s"] == pytest.approx(r["tokens_per_s"])
    for r in evals:
        assert history[r["step"]]["val/loss/add"] == pytest.approx(r["task_loss"]["add"])
    first = [rec for rec in _wandb_records(run_files[1]) if rec["type"] == "run"][0]["run"]
    assert first["config"]["update"]["optimizer"]["lr"] == 0.01  # the resolved config
    summary = json.loads(subprocess.run([str(WANDB_CLI), "leet", "inspect", "--summary", "--json", str(run_files[1])],
                                        capture_output=True, text=True, check=True, timeout=60).stdout)
    assert summary["summary"]["steps"] == 4 and summary["summary"]["best_step"] == evals[-1]["best_step"]
    assert summary["state"] == "finished"
    (artifact,) = [rec["artifact"] for rec in _wandb_records(run_files[1]) if rec["type"] == "artifact"]
    files = {entry["path"] for entry in artifact["manifest"]["contents"]}
    assert artifact["type"] == "model" and "adapter_model.safetensors" in files  # the best checkpoint's weights
    assert not any(name.startswith("recipe_state") for name in files)


class RaisingLogger:
    """A logger whose third log call raises, as a service that goes away mid-run would."""

    kind = "flaky"

    def __init__(self, fail_at_call: int = 3):
        self.fail_at_call, self.calls = fail_at_call, 0

    def start(self, output_dir, config, run_id):
        return "flaky-run"

    def log(self, values, step):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise ConnectionError("the tracking service went away")

    def summary(self, values):
        pass

    def finish(self, ok):
        pass


def test_a_logger_that_fails_mid_run_warns_and_the_run_finishes(assets, tmp_path, capsys):
    cfg = _config(assets, tmp_path, metric_loggers=[{"_component_": "tests.test_loggers.RaisingLogger"}])
    _run(LORA_RECIPE, cfg)
    err = capsys.readouterr().err
    assert "metric_loggers: flaky failed at step" in err and "the tracking service went away" in err
    assert [r["step"] for r in _records(tmp_path / "out", "train")] == [1, 2, 3, 4]  # metrics.jsonl: the record


def test_the_logger_thread_never_waits_for_a_slow_logger(tmp_path):
    class Slow(RaisingLogger):
        def log(self, values, step):
            time.sleep(0.5)

    slow = Slow()
    slow.key = "slow"
    loggers = ExternalLoggers([slow], tmp_path, {})
    start = time.perf_counter()
    for step in range(20):
        loggers.log("train", step, {"loss": 1.0})
    assert time.perf_counter() - start < 1.0  # 20 calls of a logger that takes 0.5 s each: 10 s if it waited
    assert loggers.run_ids() == {"slow": "flaky-run"}
    loggers.close(timeout=0.01)  # left behind, said so


def test_records_that_come_fast_go_out_together(tmp_path):
    """Twenty steps logged at once reach a logger with log_many in a few calls, in order, none lost."""
    class Batching(RaisingLogger):
        def __init__(self):
            super().__init__()
            self.batches = []

        def log_many(self, records):
            self.batches.append([(step, values["train/loss"]) for values, step in records])

    logger = Batching()
    logger.key = "batching"
    loggers = ExternalLoggers([logger], tmp_path, {})
    loggers.run_ids()
    for step in range(1, 21):
        loggers.log("train", step, {"loss": 1.0 / step})
    loggers.close()
    assert sum(logger.batches, []) == [(step, 1.0 / step) for step in range(1, 21)]
    assert len(logger.batches) <= 3


@pytest.mark.parametrize("entry, expected", [
    ("tensorbord", "'metric_loggers[1]' is 'tensorbord': expected one of tensorboard, wandb, mlflow"),
    ({"_component_": "mft_components.training.loggers.WandBLogger", "projekt": "x"},
     "'metric_loggers[1]': mft_components.training.loggers.WandBLogger: got an unexpected keyword argument"),
    ({"_component_": "mft_components.training.loggers.MLflowLogger", "tracking_uri": "http://127.0.0.1:9"},
     "'metric_loggers[1].tracking_uri' is 'http://127.0.0.1:9': no MLflow tracking server answers there"),
])
def test_a_bad_logger_config_is_a_config_error_naming_the_key(assets, tmp_path, capsys, entry, expected):
    """Through the CLI: `mft validate` and `mft run` both say it, before any model is loaded."""
    import cli

    cfg = _config(assets, tmp_path, metric_loggers=["tensorboard", entry])
    assert cli.main(["validate", "--config", str(cfg), "--recipe", str(LORA_RECIPE), "--no-data"]) != 0
    assert expected in capsys.readouterr().err
    if isinstance(entry, str):
        assert cli.main(["run", str(LORA_RECIPE), "--config", str(cfg)]) != 0
        assert expected in capsys.readouterr().err
        assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_logger_library_that_is_not_installed_is_named(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert metric_logger_problems(["wandb"]) == [
        "'metric_loggers[0]' (wandb): the wandb package is not installed; pip install 'mft[wandb]'"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_on_localhost_gets_the_run(assets, tmp_path):
    """A real `mlflow server` on 127.0.0.1, started here, tracks the run; read back with MlflowClient."""
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{store / 'db.sqlite'}",
                               "--default-artifact-root", (store / "artifacts").as_uri(), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while metric_logger_problems([{"_component_": "mft_components.training.loggers.MLflowLogger",
                                       "tracking_uri": uri}]):
            assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(1)
        cfg = _config(assets, tmp_path, metric_loggers=[{
            "_component_": "mft_components.training.loggers.MLflowLogger", "tracking_uri": uri,
            "experiment_name": "served", "log_artifact": True}])
        _run(LORA_RECIPE, cfg)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        train = _records(tmp_path / "out", "train")
        assert _mlflow_history(client, run.info.run_id, "train/loss") == pytest.approx(
            {r["step"]: r["loss"] for r in train})
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "step_4")}
        assert "step_4/adapter_model.safetensors" in artifacts and not any("recipe_state" in a for a in artifacts)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
