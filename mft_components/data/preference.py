"""Preference data: task files of (prompt, chosen, rejected) -> tokenised pairs -> packed rows of whole pairs.

    build_preference_data(tokenizer, data_paths=..., max_length=..., max_prompt_length=...) -> PreferenceData

Each ``data_paths`` entry is a task, as in SFT (``tasks.py``); records are parsed by ``preference_records.py``
and rendered with the SFT ``ChatFormat``: ``prompt + [answer]`` is rendered as a training conversation and the
loss mask keeps only the final answer's tokens and its EOS (earlier assistant turns of the prompt carry none).

Truncation, as TRL's classic DPO tokenisation that MFTCoder's xxpo uses: when the prompt plus the longer answer
exceed ``max_length``, the prompt is cut to its LAST ``max_prompt_length`` tokens (the start is dropped, the turn
next to the answer kept); when that is still too long, both answers are cut to their FIRST
``max_length - len(prompt)`` tokens (their end, the EOS included, is dropped).

A pair is one packing unit: its chosen and rejected sequences sit side by side in one row, so the pairing holds
across micro-batches and ranks by construction. ``collate_pairs`` gives them consecutive sample ids (chosen
``2p``, rejected ``2p + 1`` for the micro-batch's pair ``p``) with position ids restarting at each, so attention
never crosses sequences (the packed layout of ``packing.py``)::

    token        c0 c1 c2 c3 r0 r1 r2 | c0 c1 r0 r1 r2 | pad
    sample_ids   0  0  0  0  1  1  1  | 2  2  3  3  3  | -1
    position_ids 0  1  2  3  0  1  2  | 0  1  0  1  2  | 0
    pair         0 (task a)           | 1 (task b)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mft_components.data.build import _raise_problems, resolve_data_config
from mft_components.data.dataset import MFTData, split_task
from mft_components.data.packing import collate_sequences
from mft_components.data.preference_records import parse_preference_record
from mft_components.data.records import BadRecord, DataError, decode_record
from mft_components.data.templates import ChatFormat

__all__ = ["PairSample", "PreferenceData", "tokenize_pair", "truncate_pair", "collate_pairs", "pair_from_ids",
           "resolve_preference_config", "build_preference_data", "PAIR_KEYS"]

# Batch keys of the pair-level tensors ``collate_pairs`` adds (shape [P], P = pairs of the micro-batch).
PAIR_KEYS = ("pair_task_ids", "pair_index")


@dataclass
class PairSample:
    """One tokenised preference pair, packed as one unit.

    Args:
        input_ids: int32 chosen ids followed by rejected ids (its length is what packing sees).
        loss_mask: bool, True on the answer tokens and EOS of each.
        task_id: index into the data's task names.
        chosen_len: how many of ``input_ids`` are the chosen sequence.
        index: the pair's position in its split (train or valid): the key of its precomputed reference log-probs.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    task_id: int
    chosen_len: int
    index: int = -1


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: int) -> tuple[list[int], list[int], list[int], bool]:
    """TRL's classic DPO truncation (module docstring) of token lists; the answer lists are cut as given (their
    loss masks must be cut alike). Returns the three lists and whether anything was cut."""
    longer = max(len(chosen), len(rejected))
    cut = False
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        prompt, cut = prompt[-max_prompt_length:], True
    if len(prompt) + longer > max_length:
        keep = max_length - len(prompt)
        chosen, rejected, cut = chosen[:keep], rejected[:keep], True
    return prompt, chosen, rejected, cut


def tokenize_pair(chat_format: ChatFormat, tokenizer, prompt: list[dict], chosen: str, rejected: str,
                  max_length: int, max_prompt_length: int) -> tuple[list[int], tuple, tuple, bool]:
    """``(prompt ids, (chosen ids, mask), (rejected ids, mask), truncated)``: each answer rendered after the
    prompt with the SFT format, loss on the answer and its EOS only, then ``truncate_pair``.

    Raises:
        ValueError: the format does not render the prompt as a prefix of the conversation.
    """
    prompt_ids = chat_format.prompt_ids(prompt, tokenizer)
    answers = []
    for answer in (chosen, rejected):
        ids, mask = chat_format.render([*prompt, {"role": "assistant", "content": answer}], tokenizer)
        if ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat format does not render the prompt as a prefix of the conversation")
        answers.append((list(ids[len(prompt_ids):]), list(mask[len(prompt_ids):])))
    (c_ids, c_mask), (r_ids, r_mask) = answers
    p, c, r, cut = truncate_pair(prompt_ids, c_ids, r_ids, max_length, max_prompt_length)
    return p, (c, c_mask[:len(c)]), (r, r_mask[:len(r)]), cut


def _pair_sample(prompt_ids, chosen, rejected, task_id: int, index: int) -> PairSample:
    (c_ids, c_mask), (r_ids, r_mask) = chosen, rejected
    no_loss = [False] * len(prompt_ids)
    ids = np.asarray([*prompt_ids, *c_ids, *prompt_ids, *r_ids], dtype=np.int32)
    mask = np.asarray([*no_loss, *c_mask, *no_loss, *r_mask], dtype=bool)
    return PairSample(ids, mask, task_id, len(prompt_ids) + len(c_ids), index)


def pair_from_ids(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int],
                  task_id: int = 0, index: int = -1) -> PairSample:
    """A pair from token ids (every answer token carries loss): for tests and tools holding tokens already."""
    return _pair_sample(list(prompt_ids), (list(chosen_ids), [True] * len(chosen_ids)),
                        (list(rejected_ids), [True] * len(rejected_ids)), task_id, index)


def collate_pairs(rows: Sequence[Sequence[PairSample] | None], *, pad_to: int | None = None,
                  pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The batch dict of ``packing.collate`` (shifted labels, position ids restarting per sequence, sample ids,
    task ids) for rows of whole pairs, plus per pair: ``pair_task_ids`` and ``pair_index`` (its index in its
    split, the key of precomputed reference log-probs), both int64 [P]."""
    batch = collate_sequences(rows, _pair_sequences, pad_to=pad_to, pad_id=pad_id)
    pairs = [pair for row in rows for pair in row or ()]
    batch["pair_task_ids"] = torch.tensor([int(p.task_id) for p in pairs], dtype=torch.int64)
    batch["pair_index"] = torch.tensor([int(p.index) for p in pairs], dtype=torch.int64)
    return batch


def _pair_sequences(pair: PairSample) -> tuple[tuple, tuple]:
    """A pair's two sequences (chosen, then rejected), each its own sample in the batch."""
    ids, mask, c = pair.input_ids, pair.loss_mask, pair.chosen_len
    return (ids[:c], mask[:c], pair.task_id), (ids[c:], mask[c:], pair.task_id)


@dataclass
class PreferenceData(MFTData):
    """``MFTData`` whose samples are ``PairSample``s; the loaders collate them with ``collate_pairs``.

    Attributes (besides ``MFTData``'s):
        max_length, max_prompt_length: the truncation limits.
    """

    max_length: int = 1024
    max_prompt_length: int = 512

    def collate_for(self, split: str):
        """The collate function of the ``split`` loader (``sampling.py`` calls it with rows of samples)."""
        del split  # both splits collate alike
        return collate_pairs

    def fingerprint(self) -> str:
        """sha256 of every pair's tokens and task, train then valid: what precomputed log-probs are keyed to."""
        h = hashlib.sha256()
        for samples in (self.train_samples, self.valid_samples):
            for s in samples:
                h.update(np.asarray([s.task_id, s.chosen_len, len(s.input_ids)], dtype=np.int64).tobytes())
                h.update(np.asarray(s.input_ids, dtype=np.int32).tobytes())
                h.update(np.asarray(s.loss_mask, dtype=bool).tobytes())
            h.update(b"|")
        return h.hexdigest()


def _read_pairs(path: Path, task_id: int, chat_format: ChatFormat, tokenizer, max_length: int,
                max_prompt_length: int, counts: dict, problems: list[str]) -> list[PairSample]:
    pairs = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            counts["records"] += 1
            try:
                prompt, chosen, rejected = parse_preference_record(decode_record(line))
                p, c, r, cut = tokenize_pair(chat_format, tokenizer, prompt, chosen, rejected, max_length,
                                             max_prompt_length)
            except BadRecord as e:
                problems.append(f"{path}:{line_no}: {e.field}: {e.problem}")
                counts["bad"] += 1
                continue
            except ValueError as e:
                problems.append(f"{path}:{line_no}: record: {e}")
                counts["bad"] += 1
                continue
            counts["truncated"] += int(cut)
            pairs.append(_pair_sample(p, c, r, task_id, -1))
    return pairs


def resolve_preference_config(tokenizer, *, max_length, max_prompt_length, seq_len, **options):
    """Everything ``build_preference_data`` settles before it reads a record (its arguments of the same names;
    ``seq_len`` None means ``2 * max_length``): the limits, then ``build.resolve_data_config``'s checks. ``mft
    validate`` calls it.

    Raises:
        DataError: naming the ``data.*`` key.
    """
    for key, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"data.{key}: expected a positive integer, got {value!r}")
    if max_prompt_length >= max_length:
        raise DataError(f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length "
                        f"({max_length}): the answers need room after the prompt")
    seq_len = 2 * max_length if seq_len is None else seq_len
    if isinstance(seq_len, int) and seq_len < 2 * max_length:
        raise DataError(f"data.seq_len ({seq_len}) must be at least 2 * data.max_length ({2 * max_length}): a "
                        "row holds a pair's chosen and rejected sequences")
    return resolve_data_config(tokenizer, seq_len=seq_len, truncation="truncate", **options)


def build_preference_data(
    tokenizer,
    *,
    data_paths: Sequence[str],
    valid_data_paths: Sequence[str] | None = None,
    valid_ratio: float = 0.05,
    valid_size: int | None = None,
    template: str = "mft",
    role_markers: dict | None = None,
    add_bos: bool = False,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    seq_len: int | None = None,
    packing: str = "pack",
    task_sampling: str = "proportional",
    temperature: float | None = None,
    on_bad_record: str = "error",
    seed: int = 42,
    rank: int = 0,
    world_size: int = 1,
) -> PreferenceData:
    """Read, validate, tokenise and split preference tasks (the ``data:`` node of the preference recipe).

    Args (those of ``build.build_mft_data`` keep their meaning):
        max_length: longest prompt + answer sequence; longer pairs are truncated (module docstring).
        max_prompt_length: the prompt is cut to its last ``max_prompt_length`` tokens first (< max_length).
        seq_len: packed row length; at least ``2 * max_length`` so a pair always fits (default that).

    Raises:
        DataError: bad options (naming the ``data.*`` key), paths or records (``path:line: field: problem``).
    """
    del rank, world_size  # the split is rank-independent; loaders take the rank later
    chat_format, tasks, valid_tasks = resolve_preference_config(
        tokenizer, data_paths=data_paths, valid_data_paths=valid_data_paths, template=template,
        role_markers=role_markers, add_bos=add_bos, max_length=max_length, max_prompt_length=max_prompt_length,
        seq_len=seq_len, packing=packing, task_sampling=task_sampling, temperature=temperature,
        on_bad_record=on_bad_record, valid_ratio=valid_ratio, valid_size=valid_size,
    )
    seq_len = 2 * max_length if seq_len is None else seq_len
    task_names = list(tasks)
    problems: list[str] = []
    train: list[PairSample] = []
    valid: list[PairSample] = []
    counts: dict[str, dict[str, int]] = {}
    for t, name in enumerate(task_names):
        c = dict.fromkeys(("records", "bad", "kept", "turns", "tokens", "loss_tokens", "dropped", "truncated", "train",
                           "valid"), 0)
        read = {split: [p for f in files for p in _read_pairs(f, t, chat_format, tokenizer, max_length,
                                                              max_prompt_length, c, problems)]
                for split, files in (("train", tasks[name]), ("valid", valid_tasks.get(name, [])))}
        task_train, task_valid = read["train"], read["valid"]
        if not valid_tasks:
            held = set(split_task(len(task_train), name, seed, valid_ratio, valid_size).tolist())
            task_valid = [p for i, p in enumerate(task_train) if i in held]
            task_train = [p for i, p in enumerate(task_train) if i not in held]
        c["kept"] = len(task_train) + len(task_valid)
        c["tokens"] = sum(len(p.input_ids) for p in task_train + task_valid)
        c["loss_tokens"] = sum(int(p.loss_mask.sum()) for p in task_train + task_valid)
        c["train"], c["valid"] = len(task_train), len(task_valid)
        train += task_train
        valid += task_valid
        counts[name] = c
    if problems and on_bad_record == "error":
        _raise_problems(problems, ", ".join(task_names))
    empty = [n for n in task_names if counts[n]["train"] == 0]
    if empty:
        raise DataError("task(s) without training pairs: " + "; ".join(
            f"{n}: {counts[n]['records']} records, {counts[n]['bad']} bad" for n in empty))
    for i, p in enumerate(train):
        p.index = i
    for i, p in enumerate(valid):
        p.index = i
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreferenceData(
        task_names=task_names, chat_format=chat_format, train_samples=train, valid_samples=valid, seq_len=seq_len,
        packing=packing, task_sampling=task_sampling, temperature=temperature, seed=int(seed),
        pad_id=int(pad_id if pad_id is not None else 0), eos_token=tokenizer.eos_token, skipped=problems,
        task_files={n: [str(f) for f in files] for n, files in tasks.items()}, counts=counts,
        max_length=max_length, max_prompt_length=max_prompt_length,
    )
