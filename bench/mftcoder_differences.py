"""Where mft computes exactly what MFTCoder approximates, measured on the demo data (docs/migrating-from-mftcoder.md).

    python bench/mftcoder_differences.py              # SmolLM2-135M-Instruct + dataframebench from ~/.cache/mft
    python bench/mftcoder_differences.py --steps 2    # fewer model forwards

Five figures, each from MFTCoder's rule (re-implemented here from its source, v0.5) against mft's code:

0. Tokenisation: every demo conversation through MFTCoder's sft rule (``UniformEncoder._tokenize_fields``, chatML
   records) against mft's samples: token ids and loss masks.
1. Loss of an optimizer step. MFTCoder reduces each micro-batch on its own (``loss_func_mft``) and DeepSpeed /
   accelerate average the micro-batches' gradients, so the step loss is the MEAN OVER MICRO-BATCHES of per-micro-
   batch case1..4 losses; mft's ``TaskWeightedLoss`` normalises over the whole step. Per-token losses come from
   the real model on real samples (one sample per row, MFTCoder's ``padding`` mode), and the same global batch of
   8 samples is split 8x1, 4x2, 2x4 and 1x8 (micro-batches x rows).
2. Packing. MFTCoder's ``pack`` (``UniformEncoder``) concatenates samples in file order into rows of
   ``seq_length + 1`` tokens with one encoder for all tasks: a row is labelled with the task being read when it is
   emitted (rows at task boundaries carry the previous task's samples), every sample attends to the samples before
   it in its row, and the last partial row is dropped. mft packs best-fit per task-mixed epoch, never across
   samples' attention, labels every token with its own task.
3. What cross-sample attention does to the loss: the real model on MFTCoder-packed rows (one causal sequence,
   continuous positions) against the same samples run one by one (what mft's packing computes).
4. CoBa: the divergence factor MFTCoder leaves uncapped, and why the validation-loss normaliser is each task's
   full-validation loss before training (both MFTCoder and mft) rather than one sampled validation row.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mft_components import assets  # noqa: E402
from mft_components.data import build_mft_data  # noqa: E402
from mft_components.loss import CoBa, TaskWeightedLoss  # noqa: E402
from mft_components.data.packing import collate, pack_lengths  # noqa: E402

MODES = ("token", "sample", "task", "task_sample")
MFTCODER_NAMES = {"token": "case1", "sample": "case2", "task": "case3", "task_sample": "case4"}


def load_data(seq_len: int, tokenizer, truncation: str = "drop"):
    root = assets.prepare_dataframebench()
    paths = [str(root / t) for t in assets.DATAFRAMEBENCH_TASKS]
    return build_mft_data(tokenizer, data_paths=paths, seq_len=seq_len, valid_ratio=0.0, packing="padding",
                          truncation=truncation)


def token_losses(model, sample) -> torch.Tensor:
    """Per-token CE of one sample alone, in the order of its loss tokens (``labels != -100``)."""
    batch = collate([[sample]])
    n = len(sample.input_ids)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:, :n]).logits[0].float()
    labels = batch["labels"][0, :n]
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")


# ----------------------------------------------------------------------------------------- 0. tokenisation


def mftcoder_chatml(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """MFTCoder's sft tokenisation of a chat_rounds record with its default markers (content_format: NBSPs become
    spaces and a newline is appended; the user turn carries the bot marker; EOS after bot content; a newline after)."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    fmt = lambda text: text.replace("\u202f", " ").replace("\xa0", " ") + "\n"  # noqa: E731
    ids, mask = [], []
    chat = record["chat_rounds"]
    if chat[0]["role"] == "system":
        piece = enc("<s>system\n" + fmt(chat[0]["content"]))
        ids, mask, chat = piece, [False] * len(piece), chat[1:]
    for turn in chat:
        if turn["role"] in ("human", "user"):
            piece, loss = enc("<s>human\n" + fmt(turn["content"]) + "<s>bot\n"), False
        else:
            piece, loss = enc(fmt(turn["content"])) + [tokenizer.eos_token_id], True
        ids += piece
        mask += [loss] * len(piece)
        if loss:
            newline = enc("\n")
            ids += newline
            mask += [False] * len(newline)
    return ids, mask


def section_tokenisation(tokenizer) -> None:
    import json

    root = assets.prepare_dataframebench()
    data = build_mft_data(tokenizer, data_paths=[str(root / t) for t in assets.DATAFRAMEBENCH_TASKS],
                          seq_len=1 << 20, valid_ratio=0.0, packing="padding", cache_dir="")
    records = [json.loads(line) for t in assets.DATAFRAMEBENCH_TASKS
               for f in sorted((root / t).rglob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()]
    same = sum(mftcoder_chatml(r, tokenizer) == (s.input_ids.tolist(), s.loss_mask.tolist())
               for r, s in zip(records, data.train_samples))
    nbsp = sum(any(c in turn["content"] for c in "\u202f\xa0") for r in records for turn in r["chat_rounds"])
    print(f"0. Tokenisation: {same} of {len(records)} demo conversations get MFTCoder's token ids and loss masks "
          f"(turns with a non-breaking space, which MFTCoder turns into a space and mft keeps: {nbsp})")


# ----------------------------------------------------------------------------------------- 1. step loss


def step_losses(loss_fn: TaskWeightedLoss, samples, losses, rows_per_mb: int) -> tuple[float, float]:
    """(MFTCoder: mean over micro-batches of each micro-batch's loss, mft: the exact step loss)."""
    groups = [list(range(i, i + rows_per_mb)) for i in range(0, len(samples), rows_per_mb)]
    batches = [collate([[samples[j]] for j in g]) for g in groups]
    tls = [torch.cat([losses[j] for j in g]) for g in groups]
    per_mb = [float(loss_fn(t, b, loss_fn.step_counts([b]))) for t, b in zip(tls, batches)]
    counts = loss_fn.step_counts(batches)
    exact = sum(float(loss_fn(t, b, counts)) for t, b in zip(tls, batches))
    return sum(per_mb) / len(per_mb), exact


def task_weights_in_gradient(loss_fn, samples, rows_per_mb: int) -> tuple[list[float], list[float]]:
    """Per task, the total coefficient its tokens get in the step's gradient (sum of c_i): MFTCoder's and mft's."""
    k = len(loss_fn.task_names)
    groups = [list(range(i, i + rows_per_mb)) for i in range(0, len(samples), rows_per_mb)]
    batches = [collate([[samples[j]] for j in g]) for g in groups]

    def per_task(coefs_and_batches):
        out = [0.0] * k
        for coef, batch in coefs_and_batches:
            tids = batch["task_ids"][batch["labels"] != -100]
            for t in range(k):
                out[t] += float(coef[tids == t].sum())
        return out

    counts = loss_fn.step_counts(batches)
    exact = per_task((loss_fn.token_coefficients(b, counts), b) for b in batches)
    averaged = per_task((loss_fn.token_coefficients(b, loss_fn.step_counts([b])) / len(batches), b) for b in batches)
    return averaged, exact


def section_step_loss(model, data, steps: int, global_batch: int, seed: int) -> None:
    print(f"\n1. Step loss: MFTCoder's mean of per-micro-batch losses vs mft's exact step loss "
          f"({steps} steps of {global_batch} samples, proportional sampling, one sample per row)")
    rng = random.Random(seed)
    pool = list(data.train_samples)
    rng.shuffle(pool)
    batch_sets = [pool[i * global_batch:(i + 1) * global_batch] for i in range(steps)]
    losses = {id(s): token_losses(model, s) for batch in batch_sets for s in batch}
    splits = [r for r in (1, 2, 4, 8) if global_batch % r == 0]
    print("   mode (MFTCoder)      | mft, any split | MFTCoder, " + ", ".join(f"{r} row(s)" for r in splits)
          + " per micro-batch | max |diff| in a step")
    for mode in MODES:
        loss_fn = TaskWeightedLoss(mode=mode)
        loss_fn.setup(data.task_names)
        exact_all, mft_all, diffs = [], {r: [] for r in splits}, []
        for batch in batch_sets:
            tl = [losses[id(s)] for s in batch]
            for r in splits:
                averaged, exact = step_losses(loss_fn, batch, tl, r)
                mft_all[r].append(averaged)
                diffs.append(abs(averaged - exact))
            exact_all.append(exact)
        mean = statistics.mean
        print(f"   {mode:<11} ({MFTCODER_NAMES[mode]}) | {mean(exact_all):14.4f} | "
              + ", ".join(f"{mean(mft_all[r]):.4f}" for r in splits) + f" | {max(diffs):.4f}")
    loss_fn = TaskWeightedLoss(mode="task")
    loss_fn.setup(data.task_names)
    print("   task (case3): each task's share of the step's gradient, step by step (mft: equal among the tasks "
          "present; MFTCoder, 2 rows per micro-batch: depends on which micro-batches a task fell into)")
    for i, batch in enumerate(batch_sets):
        averaged, exact = task_weights_in_gradient(loss_fn, batch, 2)
        tasks = [data.task_names[s.task_id] for s in batch]
        present = [t for t in data.task_names if t in tasks]
        print(f"   step {i}: " + ", ".join(
            f"{t} x{tasks.count(t)}: mft {exact[data.task_names.index(t)]:.3f} / MFTCoder "
            f"{averaged[data.task_names.index(t)]:.3f}" for t in present))


# ----------------------------------------------------------------------------------------- 2. packing


def mftcoder_pack(samples, seq_length: int):
    """MFTCoder's pack mode (``UniformEncoder``, one encoder for all tasks): rows as (row label, samples)."""
    cap = seq_length + 1  # it keeps seq_length + 1 tokens per row and shifts them into seq_length inputs
    rows, buffer, buffer_len, dropped_long = [], [], 0, 0
    for s in samples:  # task by task, in file order
        n = len(s.input_ids)
        if n > cap:
            dropped_long += 1
        elif buffer_len + n > cap:
            rows.append((s.task_id, buffer))  # emitted while reading s's task: labelled with it
            buffer, buffer_len = [s], n
        else:
            buffer.append(s)
            buffer_len += n
    return rows, buffer, dropped_long


def section_packing(data, seq_length: int) -> None:
    samples = data.train_samples  # task by task, each in file order (valid_ratio 0)
    rows, tail, long = mftcoder_pack(samples, seq_length)
    loss_tokens = sum(int(s.loss_mask.sum()) for _, row in rows for s in row)
    wrong_rows = [(label, row) for label, row in rows if any(s.task_id != label for s in row)]
    wrong_tokens = sum(int(s.loss_mask.sum()) for label, row in wrong_rows for s in row if s.task_id != label)
    seeing_others = sum(int(s.loss_mask.sum()) for _, row in rows for s in row[1:])
    multi = sum(len(row) > 1 for _, row in rows)
    real = sum(len(s.input_ids) for _, row in rows for s in row)
    lengths = np.array([len(s.input_ids) for s in samples if len(s.input_ids) <= seq_length])
    ours = pack_lengths(lengths, seq_length, "pack")
    print(f"\n2. Packing at seq_length {seq_length} ({len(samples)} samples, {len(data.task_names)} tasks)")
    print(f"   MFTCoder pack: {len(rows)} rows ({multi} with >1 sample), {100 * real / (len(rows) * (seq_length + 1)):.1f}% "
          f"real tokens; {len(wrong_rows)} rows labelled with another task holding "
          f"{100 * wrong_tokens / loss_tokens:.2f}% of the loss tokens; {100 * seeing_others / loss_tokens:.1f}% of "
          f"the loss tokens attend to other samples; last partial row dropped: {len(tail)} samples "
          f"({sum(int(s.loss_mask.sum()) for s in tail)} loss tokens); longer than the row: {long}")
    print(f"   mft pack:      {len(ours)} rows, {100 * lengths.sum() / (len(ours) * seq_length):.1f}% real tokens; "
          f"0 mislabelled, no attention across samples, nothing dropped but the {len(samples) - len(lengths)} "
          f"samples longer than seq_len")


# ----------------------------------------------------------------------------------------- 3. cross-sample attention


def section_cross_attention(model, data, seq_length: int, n_rows: int) -> None:
    packed_rows, _, _ = mftcoder_pack(data.train_samples, seq_length)
    multi = [row for _, row in packed_rows if len(row) > 1]
    rows = multi[:: max(1, len(multi) // n_rows)][:n_rows]  # spread over the tasks
    diffs, packed_sum, alone_sum = [], 0.0, 0.0
    for row in rows:
        ids = torch.tensor(np.concatenate([s.input_ids for s in row]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids[:, :seq_length]).logits[0].float()  # one causal sequence, positions 0..L-1
        start = len(row[0].input_ids)
        for s in row[1:]:
            n = len(s.input_ids)
            if start + n > seq_length:
                break
            labels = collate([[s]])["labels"][0, :n]
            keep = labels != -100
            packed = F.cross_entropy(logits[start:start + n][keep], labels[keep], reduction="none")
            alone = token_losses(model, s)
            diffs.append((packed - alone).abs())
            packed_sum += float(packed.sum())
            alone_sum += float(alone.sum())
            start += n
    d = torch.cat(diffs)
    print(f"\n3. Cross-sample attention (MFTCoder pack) on {len(rows)} rows of {seq_length} tokens, "
          f"{int(d.numel())} loss tokens of samples after the first in their row")
    print(f"   mean |loss(packed) - loss(alone)| per token {float(d.mean()):.4f} nats (max {float(d.max()):.2f}); "
          f"mean loss {packed_sum / d.numel():.4f} packed vs {alone_sum / d.numel():.4f} alone")


# ----------------------------------------------------------------------------------------- 4. CoBa


def mftcoder_divergence_factor(max_slopes: list[float], tau: float) -> float:
    """MFTCoder's ``divergence_factor``: m * softmax(-tau * m * a / sum|a|)[-1] over the m slopes, not capped."""
    m = len(max_slopes)
    total = sum(abs(a) for a in max_slopes)
    logits = [-tau * m * a / total for a in max_slopes]
    top = max(logits)
    exp = [math.exp(x - top) for x in logits]
    return m * exp[-1] / sum(exp)


def section_coba(model, data, valid_per_task: int, seed: int) -> None:
    print("\n4. CoBa")
    # (a) Tasks whose validation losses fall ever faster (the worst one too): MFTCoder's divergence factor exceeds
    # 1 and (1 - DF) < 0 subtracts the absolute convergence score.
    coba = CoBa(warmup_steps=3, history_length=200, tau=5)
    coba.setup(3)
    for step in range(1, 9):
        coba.update(step, [1.0 - c * step**2 for c in (0.001, 0.002, 0.004)])
    last = coba.last
    df_mftcoder = mftcoder_divergence_factor(coba.max_slopes, coba.tau)
    k = coba.num_tasks
    logits = [k * (df_mftcoder * r + (1 - df_mftcoder) * a) for r, a in zip(last["rcs"], last["acs"])]
    top = max(logits)
    raw = [math.exp(x - top) for x in logits]
    raw = [x / sum(raw) for x in raw]
    weights = [(1 - k * coba.floor) * x + coba.floor for x in raw] if min(raw) < coba.floor else raw
    print(f"   (a) validation losses 1 - c t^2 (c = 0.001, 0.002, 0.004: convergence speeding up), step 8: divergence factor "
          f"MFTCoder {df_mftcoder:.2f}, mft {last['df']:.2f} (capped); weights MFTCoder "
          f"{[round(w, 3) for w in weights]}, mft {[round(w, 3) for w in coba.weights]}")
    print(f"   (b) window of the absolute convergence score with coba_history_length H=200, coba_warmup_steps=100: "
          f"MFTCoder slices its slope list (one slope per update since warmup) from index step - H, so it uses "
          f"the last H - warmup + 1 = {200 - 100 + 1} slopes; mft uses the last H = 200")
    # (c) Normalisers: MFTCoder and mft divide each task's sampled validation loss by its full-validation loss
    # before training. How far would one sampled validation row (a first sampled loss) be from it?
    rng = random.Random(seed)
    by_task: dict[int, list] = {}
    for s in data.train_samples:
        by_task.setdefault(s.task_id, []).append(s)
    print(f"   (c) normaliser: one sampled validation row (coba_sample_valid_num 1, 1 row per micro-batch) over the "
          f"task's mean validation loss, {valid_per_task} samples per task:")
    for t, name in enumerate(data.task_names):
        picks = rng.sample(by_task[t], valid_per_task)
        per_sample = [token_losses(model, s) for s in picks]
        full = float(torch.cat(per_sample).mean())
        ratios = [float(x.mean()) / full for x in per_sample]
        print(f"       {name:<17} mean loss {full:.3f}; one row / mean: {min(ratios):.2f} .. {max(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps for the step-loss comparison")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512, help="sample length limit of the model forwards")
    parser.add_argument("--pack-seq-lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--attention-rows", type=int, default=8)
    parser.add_argument("--attention-seq-length", type=int, default=1024)
    parser.add_argument("--valid-per-task", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    model_dir = assets.prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(f"model {model_dir.name} (fp32), torch {torch.__version__}, {torch.get_num_threads()} threads")
    section_tokenisation(tokenizer)

    short = load_data(args.seq_len, tokenizer, truncation="truncate")  # as the demo: long unit tests cut
    section_step_loss(model, short, args.steps, args.global_batch, args.seed)
    for seq_length in args.pack_seq_lengths:
        section_packing(load_data(max(args.pack_seq_lengths) * 2, tokenizer), seq_length)
    section_cross_attention(model, load_data(args.attention_seq_length, tokenizer), args.attention_seq_length,
                            args.attention_rows)
    section_coba(model, short, args.valid_per_task, args.seed)


if __name__ == "__main__":
    main()
