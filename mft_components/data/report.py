"""``mft data --config CONFIG [key=value ...] [--show N]``: what the recipe would train on, without a model.

Builds the ``data:`` node of a recipe config exactly as the recipe does (same tokenizer, template, split and
cache) and prints, per task: records, bad records, conversations kept, assistant turns, tokens, loss tokens,
dropped / truncated samples, train / valid samples, rows after packing and packing efficiency. ``--show N``
prints N rendered training samples (taken round-robin over the tasks) with the loss-carrying tokens marked:
green on a terminal, ``[[...]]`` otherwise, so you see exactly what is learned::

    <s>human
    Reverse a list.
    <s>bot
    [[xs[::-1]
    <|im_end|>]]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from mft_components.config.core import ConfigError, instantiate
from mft_components.config.load import load_config
from mft_components.data.records import DataError
from mft_components.data.stats import format_stats, task_stats

GREEN, RESET = "\033[32m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mft data`` command line."""
    parser.add_argument("--config", required=True, help="built-in config name or YAML file (its data: section)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print N rendered training samples with the loss-carrying tokens marked")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="mark loss tokens in colour (auto: when stdout is a terminal) or with [[...]]")
    parser.add_argument("overrides", nargs="*", help="key=value or ~key, as for `mft run`")


def render_marked(ids: Sequence[int], loss_mask: Sequence[bool], tokenizer, color: bool) -> str:
    """Decode a sample, wrapping each run of loss-carrying tokens in colour or ``[[...]]``.

    Args:
        ids: token ids of the sample.
        loss_mask: True where a token is a training target.
        tokenizer: the tokenizer that produced ``ids``.
        color: ANSI green instead of brackets.

    Returns:
        The text (special tokens such as EOS written out).
    """
    out, start = [], 0
    ids, loss_mask = list(map(int, ids)), list(map(bool, loss_mask))
    for i in range(1, len(ids) + 1):
        if i == len(ids) or loss_mask[i] != loss_mask[start]:
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if loss_mask[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def _pick(samples, num_tasks: int, n: int) -> list:
    """Up to ``n`` samples, round-robin over tasks, so every task is shown."""
    by_task: list[list] = [[] for _ in range(num_tasks)]
    for s in samples:
        by_task[s.task_id].append(s)
    picked, k = [], 0
    while len(picked) < n and any(k < len(t) for t in by_task):
        picked += [t[k] for t in by_task if k < len(t)][: n - len(picked)]
        k += 1
    return picked


def build_config_data(cfg, source: str):
    """The tokenizer and ``MFTData`` of a config's ``tokenizer:`` and ``data:`` sections, built as the recipe builds
    them (same template, split and tokenisation cache; one rank).

    Raises:
        ConfigError: a section is missing. DataError: bad records (``on_bad_record: error``) or data options.
    """
    if cfg.get("data") is None or cfg.get("tokenizer") is None:
        raise ConfigError(f"{source}: needs a `data:` and a `tokenizer:` section")
    tokenizer = instantiate(cfg.tokenizer)
    return tokenizer, instantiate(cfg.data, tokenizer=tokenizer, seed=int(cfg.get("seed", 42)), rank=0, world_size=1)


def run(args: argparse.Namespace) -> int:
    """Build the config's data and print its statistics (and samples with ``--show``).

    Returns:
        0, or 1 with the problem on stderr (bad config, bad records with ``on_bad_record: error``).
    """
    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer, data = build_config_data(cfg, args.config)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"mft data: {e}", file=sys.stderr)
        return 1
    fmt = data.chat_format
    print(f"template: {fmt.template}  seq_len: {data.seq_len}  packing: {data.packing}  "
          f"task_sampling: {data.task_sampling}  eos: {data.eos_token}")
    print(format_stats(task_stats(data)))
    for note in data.notes:
        print(note)
    if data.skipped:
        print(f"\n{len(data.skipped)} bad record(s) skipped (data.on_bad_record: skip), e.g.:")
        for line in data.skipped[:5]:
            print(f"  {line}")
    if args.show > 0:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
        legend = f"{GREEN}green{RESET}" if color else "[[...]]"
        print(f"\n{args.show} training sample(s); loss-carrying tokens in {legend}:")
        for s in _pick(data.train_samples, len(data.task_names), args.show):
            print(f"\n----- task {data.task_names[s.task_id]}: {len(s.input_ids)} tokens, "
                  f"{int(s.loss_mask.sum())} with loss -----")
            print(render_marked(s.input_ids, s.loss_mask, tokenizer, color))
    return 0
