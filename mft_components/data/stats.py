"""What a dataset holds, per task: records, bad ones, conversations kept, turns, tokens, loss tokens, dropped and
truncated conversations, train / valid samples, and the rows its training samples pack into.

    task_stats(data) -> {task: {...}}      packs each task's training samples once (``packing.py``)
    total_stats(stats) -> {...}            summed over the tasks
    format_stats(stats) -> str             the fixed-width table the recipes and ``mft data`` print
"""

from __future__ import annotations

import numpy as np

from mft_components.data.dataset import MFTData
from mft_components.data.packing import pack_lengths, packing_efficiency

__all__ = ["STAT_KEYS", "task_stats", "total_stats", "format_stats"]

STAT_KEYS = ("records", "bad", "kept", "turns", "tokens", "loss_tokens", "dropped", "truncated",
             "train", "valid", "rows", "packing_efficiency")


def task_stats(data: MFTData) -> dict[str, dict]:
    """Per task: records, bad, kept, turns, tokens, loss_tokens, dropped, truncated, train, valid (``data.counts``),
    rows (packed rows of the task's training samples alone) and packing_efficiency."""
    stats = {}
    for t, name in enumerate(data.task_names):
        s = dict(data.counts[name])
        lengths = np.array([len(x.input_ids) for x in data.train_samples if x.task_id == t], dtype=np.int64)
        rows = pack_lengths(lengths, data.seq_len, data.packing) if len(lengths) else []
        s["rows"] = len(rows)
        s["packing_efficiency"] = packing_efficiency(rows, lengths, data.seq_len) if rows else 0.0
        stats[name] = s
    return stats


def total_stats(stats: dict[str, dict]) -> dict:
    """``task_stats`` summed over the tasks (packing_efficiency weighted by rows)."""
    total = {k: sum(s[k] for s in stats.values()) for k in STAT_KEYS if k != "packing_efficiency"}
    real = sum(s["packing_efficiency"] * s["rows"] for s in stats.values())
    total["packing_efficiency"] = real / total["rows"] if total["rows"] else 0.0
    return total


def format_stats(stats: dict[str, dict]) -> str:
    """``task_stats`` and their total as a fixed-width table."""
    headers = ("task", "records", "bad", "kept", "turns", "tokens", "loss_tok", "dropped", "trunc",
               "train", "valid", "rows", "pack_eff")
    keys = ("records", "bad", "kept", "turns", "tokens", "loss_tokens", "dropped", "truncated",
            "train", "valid", "rows")
    table = [headers]
    for name, s in [*stats.items(), ("total", total_stats(stats))]:
        table.append((name, *(f"{s[k]:,}" for k in keys), f"{100 * s['packing_efficiency']:.1f}%"))
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = []
    for j, row in enumerate(table):
        if j == len(table) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
