"""`make demo-preference`'s driver (interop/demo_preference.py): which problems it pairs, and its report.

The demo end to end (pairs from the SFT demo's answers, the DPO stage) runs with `make demo-preference`; here the
parts that need no trained model.
"""

from __future__ import annotations

import json

from mft_components.interop import demo_preference as dp


def test_demo_pairs_come_from_the_val_split_with_solutions(tmp_path):
    files = dp.demo_pair_problems(tmp_path, problems=5)
    assert list(files) == list(dp.DEMO_PAIR_TASKS)
    records = {t: [json.loads(line) for line in f.read_text().splitlines()] for t, f in files.items()}
    ids = [[r["task_id"] for r in rs] for rs in records.values()]
    assert ids[0] == ids[1] and len(ids[0]) == 5 and all(i.startswith("DFB/V") for i in ids[0])  # val, not train/test
    assert all(r["solution"] and r["harness"] == "dataframebench" for rs in records.values() for r in rs)
    assert all("polars" in r["solution"] for r in records["polars_solution"])


def test_report_before_and_after():
    rows = [{"kind": "eval", "step": 0, "accuracy": 0.0, "margin": 0.0, "chosen_logp": -50.0, "rejected_logp": -40.0,
             "accuracy/a": 0.0, "margin/a": 0.0, "chosen_logp/a": -50.0, "rejected_logp/a": -40.0},
            {"kind": "eval", "step": 8, "accuracy": 0.75, "margin": 0.5, "chosen_logp": -45.0, "rejected_logp": -41.0,
             "accuracy/a": 0.75, "margin/a": 0.5, "chosen_logp/a": -45.0, "rejected_logp/a": -41.0}]
    assert dp.format_report(rows).splitlines() == [
        "held-out pairs, step 0 -> step 8:",
        "task                   reward accuracy                  reward margin  logp(chosen) - logp(rejected)",
        "a                       0.000 -> 0.750                 0.000 -> 0.500                -10.00 -> -4.00",
        "overall                 0.000 -> 0.750                 0.000 -> 0.500                -10.00 -> -4.00",
    ]
