"""mft_components/training/metrics.py: a resumed run's metrics.jsonl holds each step's rows once."""

from __future__ import annotations

import json

from mft_components.training.metrics import MetricLogger


def _steps(path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_rows_after_the_start_step_are_dropped(tmp_path, capsys):
    """A run stopped at step 5 after its step-3 checkpoint (last line cut by the kill): resuming from step 3 keeps
    the rows up to 3 and writes 4 on; a fresh start (step 0) keeps none; no start step appends to what is there."""
    path = tmp_path / "metrics.jsonl"
    rows = [("eval", 0), *[("train", s) for s in range(1, 6)], ("eval", 3)]
    path.write_text("".join(json.dumps({"kind": k, "step": s}) + "\n" for k, s in rows) + '{"kind": "tr')
    logger = MetricLogger(tmp_path, tensorboard=False, start_step=3)
    logger.log("train", 4, {"loss": 1.0})
    logger.close()
    assert _steps(path) == [("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4)]
    assert "dropped 3 row(s) of steps after 3" in capsys.readouterr().err

    MetricLogger(tmp_path, tensorboard=False).close()
    assert len(_steps(path)) == 6
    MetricLogger(tmp_path, tensorboard=False, start_step=0).close()
    assert path.read_text() == ""
