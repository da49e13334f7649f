"""GPU training throughput: mft through its recipe with a shipped config's defaults, against the Hugging Face stack.

    python bench/gpu_throughput.py                       # CUDA: the core set on Llama-3.2-3B, table -> RESULTS-GPU.md
    python bench/gpu_throughput.py --set all --budget-s 900 --out /tmp/gpu   # every contender, both models
    python bench/gpu_throughput.py --contenders mft,mft-varlen,hf-packed-liger
    python bench/gpu_throughput.py --tiny --out /tmp/t   # any machine (the default without CUDA): a tiny Llama

Models: random-initialised bf16 models of real architectures, built from the configs written below
(Llama-3.2-3B, Qwen2.5-Coder-7B; nothing is downloaded) and saved once under --work. Speed does not depend on the
weights' values. Data: the demo's four dataframebench tasks (``.device/data`` on the GPU machine, else
``mft_components.assets``) with SmolLM2's tokenizer, rendered by mft. Setting (issue 13's): seq_len 4096, packing, 2 rows
of 4096 tokens per optimizer step, the config's LoRA (rank 64, alpha 128, dropout 0.05, every linear of the
decoder), bf16, AdamW.

Every contender trains on the same micro-batches: those of mft's loader for the config's data settings and seed
(the baselines take the same rows; ``hf-padded`` puts each of their samples in a row of its own). Contenders
(each in its own process on CUDA, so peak memory is its own):

  hf-padded        transformers + peft as MFTCoder runs them: one sample per row padded to the micro-batch's
                   longest, full float32 logits, per-task token-mean loss (MFTCoder's case3), sdpa, fused AdamW
  hf-packed-liger  transformers + peft on the packed rows (sdpa with transformers' block mask from the restarting
                   position_ids) with liger-kernel's RoPE, RMSNorm, SwiGLU and fused linear cross entropy
  mft              ``recipes/lora_finetune_distributed.py --config llama_lora`` with the config as shipped
                   (attn_implementation auto, compile auto, no activation checkpointing)
  mft-*            the same with one setting changed (``VARIANTS``): other attentions, eager, liger, activation
                   checkpointing modes, QLoRA, full fine-tuning, and Qwen2.5-Coder-7B with qwen_qlora's settings

Printed and recorded: median real tokens/s over the timed steps (mft: its metrics.jsonl rates per log interval,
the first interval, which holds the compilation, left out; baselines: per step after 3 warm-up steps), peak GiB
(``torch.cuda.max_memory_allocated``), MFU against a bf16 matmul rate measured in the same run, ratios to the
baselines, and the attention and compile scope mft chose. On CUDA the table is appended to bench/RESULTS-GPU.md
(dated, with GPU, driver and versions) and, with every contender's log, written to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))  # mft_components from this working tree, whatever is installed
sys.path.insert(1, str(BENCH_DIR))

from train_throughput import model_flops_per_token  # noqa: E402  (the same FLOP count as the CPU bench)

# config.json of the real models (Hugging Face hub files), random weights are drawn from them.
MODEL_CONFIGS: dict[str, dict] = {
    "llama-3.2-3b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen2.5-coder-7b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28, "attention_dropout": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
    },
    # --tiny: the Llama architecture at test size (SmolLM2's vocabulary, so the tokenizer's ids fit)
    "tiny-llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "initializer_range": 0.02, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2,
    },
}

# mft contenders: (model, shipped config, recipe, recipe overrides, keep the config's batch size).
RECIPES = {"lora": "lora_finetune_distributed", "full": "full_finetune_distributed"}
VARIANTS: dict[str, tuple[str, str, str, tuple[str, ...], bool]] = {
    "mft": ("llama-3.2-3b", "llama_lora", "lora", (), False),
    "mft-qlora": ("llama-3.2-3b", "llama_qlora", "lora", ("model.activation_checkpointing=false",), False),
    "mft-ac": ("llama-3.2-3b", "llama_lora", "lora", ("model.activation_checkpointing=true",), False),
    "mft-qlora-ac": ("llama-3.2-3b", "llama_qlora", "lora", ("model.activation_checkpointing=true",), False),
    "mft-ac-selective": ("llama-3.2-3b", "llama_lora", "lora", ("model.activation_checkpointing=selective",), False),
    "mft-ac-every_other": ("llama-3.2-3b", "llama_lora", "lora", ("model.activation_checkpointing=every_other",),
                           False),
    "mft-eager": ("llama-3.2-3b", "llama_lora", "lora", ("model.compile=false",), False),
    "mft-varlen": ("llama-3.2-3b", "llama_lora", "lora", ("model.attn_implementation=varlen_attn",), False),
    "mft-sdpa": ("llama-3.2-3b", "llama_lora", "lora", ("model.attn_implementation=sdpa",), False),
    "mft-sdpa_varlen": ("llama-3.2-3b", "llama_lora", "lora", ("model.attn_implementation=sdpa_varlen",), False),
    "mft-liger": ("llama-3.2-3b", "llama_lora", "lora", ("model.liger=true", "loss.cross_entropy=liger"), False),
    "mft-liger-ce": ("llama-3.2-3b", "llama_lora", "lora", ("loss.cross_entropy=liger",), False),
    "mft-full": ("llama-3.2-3b", "qwen_full", "full", ("model.activation_checkpointing=false",), False),
    "mft-7b-qlora": ("qwen2.5-coder-7b", "qwen_qlora", "lora", (), True),
}
BASELINES = ("hf-padded", "hf-packed-liger")
SETS = {
    # the table bench/gpu_check.sh measures, most wanted first, in two parts of three that each fit a 10-minute
    # command (bench: mft, hf-packed-liger, mft-qlora; bench-ac: the rest; hf-padded, MFTCoder's stack, was
    # measured in issue 13 and goes last)
    "core": ("mft", "hf-packed-liger", "mft-qlora", "mft-ac", "mft-qlora-ac", "hf-padded"),
    "all": (*BASELINES, *VARIANTS),
    "tiny": ("hf-padded", "hf-packed-liger", "mft"),
}
BASELINE_WARMUP = 3
# A GPU contender that starts with less time than this left could not log twice (load, compile, steps): not started.
MIN_CONTENDER_S = 60


# --------------------------------------------------------------------------------------------- shared inputs


def build_random_model(name: str, work: Path, tokenizer_dir: Path, device: str) -> Path:
    """A Hugging Face model directory of architecture ``name`` with random bf16 weights (built once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = work / name
    if (out / "config.json").is_file():
        return out
    spec = dict(MODEL_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="5GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the contenders' processes need the memory, not this one
    for f in tokenizer_dir.iterdir():  # the tokenizer travels with the model, as in a real model directory
        if f.is_file() and f.name != "config.json" and f.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copy(f, partial / f.name)
    partial.rename(out)
    print(f"built {name} in {time.perf_counter() - start:.0f}s: {out}", flush=True)
    return out


def default_inputs() -> tuple[Path, list[str]]:
    """SmolLM2's tokenizer and the demo's task directories: carried in .device/ on the GPU machine."""
    carried_tok, carried_data = REPO / ".device" / "tok", REPO / ".device" / "data"
    if carried_tok.is_dir() and carried_data.is_dir():
        return carried_tok, sorted(str(p) for p in carried_data.iterdir() if p.is_dir())
    from mft_components.assets import prepare_dataframebench, prepare_smollm2

    data = Path(prepare_dataframebench())
    return Path(prepare_smollm2()), sorted(str(p) for p in data.iterdir() if p.is_dir())


def contender_config(name: str, model_dir: Path, tokenizer_dir: Path, data_paths: list[str], out: Path,
                     args) -> tuple[Path, Path, list[str]]:
    """(recipe file, config file, overrides) of an mft contender: the shipped config with the bench's model, data
    and length, evaluation and intermediate checkpoints off (they are not training time). The run's output
    directory (its final checkpoint: the adapter and AdamW state, ~1 GB for the 3B, ~30 GB for full fine-tuning)
    lies under ``args.runs``, beside the models, not in ``out``, the folder that comes back from a GPU machine."""
    _, config_name, recipe, overrides, keep_batch = VARIANTS[name]
    cfg = yaml.safe_load((REPO / "configs" / f"{config_name}.yaml").read_text())
    cfg["output_dir"] = str(args.runs / name)
    cfg["model"]["model_dir"] = str(model_dir)
    cfg["tokenizer"]["path"] = str(tokenizer_dir)
    data = cfg["data"]
    data["data_paths"] = list(data_paths)
    data.pop("valid_size", None)
    data["valid_ratio"] = 0.0
    data["seq_len"] = args.seq_len
    if args.tiny:  # short rows: keep the first seq_len tokens of longer conversations, as the demo does
        data["truncation"] = "truncate"
    cfg.update(max_steps=args.steps, resume=None, eval_every_n_steps=None, save_every_n_steps=None,
               early_stopping_patience=None, tensorboard=False, log_every_n_steps=args.log_every)
    if not keep_batch:
        cfg.update(micro_batch_size=args.rows, gradient_accumulation_steps=1)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return REPO / "recipes" / f"{RECIPES[recipe]}.py", path, list(overrides)


def loader_steps(cfg_path: Path, steps: int):
    """The first ``steps`` optimizer steps of mft's loader for a contender config: lists of micro-batches."""
    from mft_components.config import instantiate, load_config
    from mft_components.data.sampling import build_train_loader

    cfg = load_config(cfg_path)
    tokenizer = instantiate(cfg.tokenizer)
    data = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed, rank=0, world_size=1)
    loader = build_train_loader(data, micro_batch_size=cfg.micro_batch_size,
                                gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    loader.sampler.set_epoch(0)
    batches, out = iter(loader), []
    for _ in range(steps):
        out.append([next(batches) for _ in range(cfg.gradient_accumulation_steps)])
    return cfg, data.task_names, out


# ------------------------------------------------------------------------------------------------ contenders


def run_mft(name: str, model_dir: Path, tokenizer_dir: Path, data_paths: list[str], out: Path, args) -> dict:
    """The recipe in a subprocess (CUDA) or in this process (--tiny); rates from its metrics.jsonl (copied to
    ``out``; the run directory, checkpoint included, is deleted). A run killed at its time limit still gives
    figures when it logged twice (the first interval holds the compilation)."""
    recipe, cfg_path, overrides = contender_config(name, model_dir, tokenizer_dir, data_paths, out, args)
    run_dir = args.runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path = out / f"{name}.log"
    killed = None
    if args.tiny:
        import contextlib
        import io
        import runpy

        buffer = io.StringIO()
        recipe_main = runpy.run_path(str(recipe), run_name="gpu_throughput")["recipe_main"]
        try:
            with contextlib.redirect_stdout(buffer):
                recipe_main(["--config", str(cfg_path), *overrides])
        except SystemExit as e:  # the recipe's way of reporting bad data or config
            raise RuntimeError(f"recipe exited: {e.code}") from None
        finally:
            log_path.write_text(buffer.getvalue())
    else:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        try:
            with open(log_path, "w") as log:
                proc = subprocess.run([sys.executable, str(recipe), "--config", str(cfg_path), *overrides],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=_timeout(args))
        except subprocess.TimeoutExpired as e:
            killed = f"killed at its {e.timeout:.0f}s limit"
        else:
            if proc.returncode != 0:
                raise RuntimeError(f"exit {proc.returncode}: {_tail(log_path)}")
    train = _train_records(run_dir / "metrics.jsonl", out / f"{name}.metrics.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)
    if killed and len(train) < 2:
        raise RuntimeError(f"{killed} after {len(train)} log steps: {_tail(log_path)}")
    rates = [r["tokens_per_s"] for r in train]
    text = log_path.read_text()
    chosen = {key: line.split(":", 1)[1].strip() for line in text.splitlines()
              for key in ("attention", "compile") if line.startswith(f"[mft] {key}:")}
    return {
        "tokens_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates),
        "rates": rates,
        "peak_gib": max(r["peak_memory_gb"] for r in train) if args.cuda else float("nan"),
        "losses": [r["loss"] for r in train],
        "attention": chosen.get("attention", "?"), "compile": chosen.get("compile", "?"),
        "method": yaml.safe_load(cfg_path.read_text())["model"].get("method", "lora"),
        **({"note": f"{killed} after step {train[-1]['step']}"} if killed else {}),
    }


def _train_records(metrics: Path, keep: Path) -> list[dict]:
    """The train records of a run's metrics.jsonl (a run killed while writing leaves a partial last line), which
    is kept as ``keep``."""
    if not metrics.is_file():
        return []
    shutil.copy(metrics, keep)
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if r.get("kind") == "train"]


def run_baseline(name: str, cfg_path: Path, args) -> dict:
    """transformers + peft on the micro-batches of mft's loader (``hf-padded`` or ``hf-packed-liger``)."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mft_components.models import LIGER_KERNELS, apply_liger_kernels, resolve_lora_config

    cfg, task_names, steps = loader_steps(cfg_path, args.baseline_steps + BASELINE_WARMUP)
    device = torch.device("cuda" if args.cuda else "cpu")
    model = AutoModelForCausalLM.from_pretrained(cfg.model.model_dir, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(device)
    liger = name == "hf-packed-liger" and args.cuda  # liger's kernels are Triton: CUDA only
    if liger:
        apply_liger_kernels(model, LIGER_KERNELS)
    lora = resolve_lora_config(dict(cfg.model.lora), model.config.model_type)
    model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optimizer.lr,
                                  weight_decay=cfg.optimizer.weight_decay, fused=args.cuda)
    hf = model.get_base_model()
    flce = None
    if liger:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

    def packed_step(micro_batches):
        for mb in micro_batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            hidden = hf.model(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                              use_cache=False).last_hidden_state
            labels = mb["labels"].reshape(-1)  # already shifted by mft's collator
            if flce is not None:
                loss = flce(hf.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), labels)
            else:
                loss = F.cross_entropy(hf.lm_head(hidden).float().reshape(-1, hf.config.vocab_size), labels)
            (loss / len(micro_batches)).backward()
        return loss

    def padded_step(micro_batches):
        samples = [s for mb in micro_batches for s in _samples_of(mb)]
        chunks = _padded_micro_batches(samples, args.seq_len * cfg.micro_batch_size)
        for chunk in chunks:
            ids, attention, labels, tasks = _collate_padded(chunk, pad_id=0)
            ids, attention, labels, tasks = (t.to(device) for t in (ids, attention, labels, tasks))
            logits = model(input_ids=ids, attention_mask=attention).logits.float()  # MFTCoder: full fp32 logits
            token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
            mask = (labels[:, 1:] != -100).float()
            per_task = [(token_loss * m).sum() / m.sum() for t in tasks.unique()
                        if (m := mask * (tasks[:, None] == t)).sum() > 0]
            (torch.stack(per_task).mean() / len(chunks)).backward()  # case3, reduced per micro-batch
        return token_loss.sum() / mask.sum()

    train_step = packed_step if name == "hf-packed-liger" else padded_step
    rates, losses = [], []
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, micro_batches in enumerate(steps):
        start = time.perf_counter()
        loss = train_step(micro_batches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses.append(float(loss.detach()))
        if i >= BASELINE_WARMUP:
            rates.append(sum(int((mb["sample_ids"] >= 0).sum()) for mb in micro_batches) / seconds)
    return {
        "tokens_per_s": statistics.median(rates), "rates": rates,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.cuda else float("nan"),
        "losses": losses, "attention": "sdpa (transformers' mask)" if name != "hf-padded" else "sdpa (padding mask)",
        "compile": "off" + (", liger RoPE/RMSNorm/SwiGLU/FLCE" if liger else ""), "method": "lora",
    }


def _samples_of(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The samples of a collated micro-batch: (input_ids, labels in transformers' unshifted form, task id)."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["sample_ids"][b]
        for s in ids[ids >= 0].unique().tolist():
            where = (ids == s).nonzero().reshape(-1)
            start, end = int(where[0]), int(where[-1]) + 1
            # mft's labels[t] is the target of position t; transformers wants it at t + 1 (it shifts itself)
            labels = torch.cat([torch.tensor([-100]), batch["labels"][b, start : end - 1]])
            out.append((batch["input_ids"][b, start:end], labels, int(batch["task_ids"][b, start])))
    return out


def _padded_micro_batches(samples, max_tokens: int) -> list[list]:
    """Consecutive samples grouped so that a micro-batch padded to its longest holds at most ``max_tokens``."""
    chunks, current, longest = [], [], 0
    for sample in samples:
        n = len(sample[0])
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, longest = [], 0
        current.append(sample)
        longest = max(longest, n)
    return chunks + [current] if current else chunks


def _collate_padded(samples, pad_id: int):
    longest = max(len(ids) for ids, _, _ in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), longest), dtype=torch.long)
    labels = torch.full((len(samples), longest), -100, dtype=torch.long)
    for row, (sample_ids, sample_labels, _) in enumerate(samples):
        n = len(sample_ids)
        ids[row, :n], attention[row, :n], labels[row, :n] = sample_ids, 1, sample_labels
    return ids, attention, labels, torch.tensor([task for _, _, task in samples])


def _timeout(args) -> float:
    """A contender's time limit: its own, cut to what is left of the run's budget (then it is killed, and the
    table says so, rather than the whole run overrunning)."""
    return max(1.0, min(args.contender_timeout, args.budget_s - (time.perf_counter() - args.began)))


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- the ceiling


def matmul_rate(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul FLOP/s: the best of ``repeats`` (CUDA: timed with events; the MFU denominator)."""
    if device.type != "cuda":
        n = 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for i in range(repeats + 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t
        if i >= 3:
            best = min(best, seconds)
    return 2 * n**3 / best


def flops_per_token(model_dir: Path, method: str, mean_sample_tokens: float) -> float:
    """Training FLOPs per real token: LoRA / QLoRA 4 x matmul parameters + attention (``model_flops_per_token``);
    full fine-tuning adds the weight gradients (6 x parameters)."""
    lora = model_flops_per_token(model_dir, mean_sample_tokens)
    matmul_params = model_flops_per_token(model_dir, 0.0) / 4
    return lora + 2 * matmul_params if method == "full" else lora


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default=None, help="which contenders (default: core; tiny)")
    parser.add_argument("--contenders", help="comma-separated contender names (overrides --set)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (default without CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="results, configs and logs (default: a temp dir)")
    parser.add_argument("--work", type=Path, default=None, help="where the random models are built (default: --out)")
    parser.add_argument("--data", nargs="*", help="task directories (default: the demo's four)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: SmolLM2's)")
    parser.add_argument("--seq-len", type=int, default=None, help="row length (default 4096; tiny 512)")
    parser.add_argument("--rows", type=int, default=2, help="rows per optimizer step (micro_batch_size)")
    parser.add_argument("--steps", type=int, default=None, help="mft optimizer steps (default 15; tiny 4)")
    parser.add_argument("--log-every", type=int, default=None, help="mft log interval (default 5; tiny 2)")
    parser.add_argument("--baseline-steps", type=int, default=None, help="timed baseline steps (default 6; tiny 2)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip contenders once this is spent")
    parser.add_argument("--contender-timeout", type=float, default=600.0)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS-GPU.md")
    args = parser.parse_args(argv)
    began = args.began = time.perf_counter()
    args.cuda = torch.cuda.is_available() and not args.tiny
    args.tiny = not args.cuda
    tiny = args.tiny
    args.seq_len = args.seq_len or (512 if tiny else 4096)
    args.steps = args.steps or (4 if tiny else 15)
    args.log_every = args.log_every or (2 if tiny else 5)
    args.baseline_steps = args.baseline_steps or (2 if tiny else 6)
    if args.out is None:
        import tempfile

        args.out = Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.runs = work / "runs"
    names = (args.contenders.split(",") if args.contenders else SETS[args.set or ("tiny" if tiny else "core")])
    unknown = [n for n in names if n not in VARIANTS and n not in BASELINES]
    if unknown:
        parser.error(f"unknown contenders {unknown}; known: {', '.join((*BASELINES, *VARIANTS))}")
    tokenizer_dir, data_paths = args.tokenizer, args.data
    if tokenizer_dir is None or not data_paths:
        default_tokenizer, default_data = default_inputs()
        tokenizer_dir, data_paths = tokenizer_dir or default_tokenizer, data_paths or default_data
    device = torch.device("cuda" if args.cuda else "cpu")
    rate = matmul_rate(device)
    print(f"bf16 matmul: {rate / 1e12:.1f} TFLOP/s; results in {out}", flush=True)

    rows: list[dict] = []
    for name in names:
        model_name = "tiny-llama" if tiny else VARIANTS.get(name, VARIANTS["mft"])[0]
        spent = time.perf_counter() - began
        if spent > args.budget_s - (MIN_CONTENDER_S if args.cuda else 0):
            rows.append({"contender": name, "model": model_name,
                         "error": f"not run: {args.budget_s - spent:.0f}s left of the {args.budget_s:.0f}s budget"})
            continue
        print(f"[{spent:5.0f}s] {name} ({model_name}) ...", flush=True)
        try:
            model_dir = build_random_model(model_name, work, tokenizer_dir, "cuda" if args.cuda else "cpu")
            if name in BASELINES:
                _, cfg_path, _ = contender_config("mft", model_dir, tokenizer_dir, data_paths, out, args)
                result = _baseline_in_subprocess(name, cfg_path, out, args) if args.cuda else run_baseline(
                    name, cfg_path, args)
            else:
                result = run_mft(name, model_dir, tokenizer_dir, data_paths, out, args)
            mean_tokens = _mean_sample_tokens(out, model_dir, tokenizer_dir, data_paths, args)
            result["mfu"] = flops_per_token(model_dir, result["method"], mean_tokens) * result["tokens_per_s"] / rate
            rows.append({"contender": name, "model": model_name, **result})
        except Exception as e:  # one contender failing must not lose the others' figures
            rows.append({"contender": name, "model": model_name, "error": f"{type(e).__name__}: {e}"[-600:]})
        print(rows[-1].get("error") or f"    {rows[-1]['tokens_per_s']:,.0f} tok/s", flush=True)
        _write(out, rows, rate, args)  # after every contender: a timeout still leaves what was measured
    table = _write(out, rows, rate, args)
    print(table)
    if args.cuda and not args.no_record:
        record(rows, table, rate, args)
    return rows


def _baseline_in_subprocess(name: str, cfg_path: Path, out: Path, args) -> dict:
    """A baseline in its own process (peak memory of its own), through this script's --baseline-worker."""
    result_path = out / f"{name}.json"
    log_path = out / f"{name}.log"
    cmd = [sys.executable, __file__, "--baseline-worker", name, str(cfg_path), str(result_path),
           str(args.baseline_steps), str(args.seq_len)]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=_timeout(args))
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {_tail(log_path)}")
    return json.loads(result_path.read_text())


def _baseline_worker(argv: list[str]) -> None:
    name, cfg_path, result_path, steps, seq_len = argv
    args = argparse.Namespace(cuda=torch.cuda.is_available(), baseline_steps=int(steps), seq_len=int(seq_len))
    Path(result_path).write_text(json.dumps(run_baseline(name, Path(cfg_path), args)))


_MEAN_TOKENS: dict[Path, float] = {}


def _mean_sample_tokens(out: Path, model_dir: Path, tokenizer_dir: Path, data_paths: list[str], args) -> float:
    """Mean tokens per sample over the steps the contenders train on (for the attention FLOPs)."""
    if model_dir not in _MEAN_TOKENS:
        _, cfg_path, _ = contender_config("mft", model_dir, tokenizer_dir, data_paths, out, args)
        _, _, steps = loader_steps(cfg_path, args.steps)
        lengths = [len(ids) for step in steps for mb in step for ids, _, _ in _samples_of(mb)]
        _MEAN_TOKENS[model_dir] = statistics.mean(lengths)
    return _MEAN_TOKENS[model_dir]


def _write(out: Path, rows: list[dict], rate: float, args) -> str:
    table = format_table(rows)
    (out / "results.json").write_text(json.dumps({"matmul_flops": rate, "rows": rows}, indent=1, default=str))
    (out / "results.md").write_text(table + "\n")
    return table


def format_table(rows: list[dict]) -> str:
    def ref(model, name):
        return next((r["tokens_per_s"] for r in rows if r.get("contender") == name and r.get("model") == model
                     and "tokens_per_s" in r), None)

    lines = ["| contender | model | tok/s | peak GiB | MFU | vs hf-packed-liger | vs hf-padded | attention | compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} | {r['model']} | - | - | - | - | - | {r['error'][:160]} | |")
            continue
        ratios = []
        for base in BASELINES:
            base_rate = ref(r["model"], base)
            ratios.append(f"{r['tokens_per_s'] / base_rate:.2f}x" if base_rate else "-")
        contender = f"{r['contender']} ({r['note']})" if r.get("note") else r["contender"]
        lines.append(f"| {contender} | {r['model']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
                     f"{100 * r['mfu']:.1f}% | {ratios[1]} | {ratios[0]} | {r['attention']} | {r['compile']} |")
    return "\n".join(lines)


def record(rows: list[dict], table: str, rate: float, args) -> None:
    """Append a dated section to bench/RESULTS-GPU.md."""
    import transformers

    versions = [f"torch {torch.__version__} (CUDA {torch.version.cuda})", f"transformers {transformers.__version__}"]
    for package in ("peft", "torchao", "liger_kernel", "triton"):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package.replace('_', '-'))}")
        except Exception:
            versions.append(f"{package} -")
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        driver = "-"
    header = (
        f"\n## {datetime.date.today().isoformat()} gpu_throughput\n\n"
        f"GPU: {torch.cuda.get_device_name()}, driver {driver}; {platform.node()}. {', '.join(versions)}.\n"
        f"bf16 matmul {rate / 1e12:.0f} TFLOP/s (the MFU denominator). seq_len {args.seq_len}, {args.rows} rows per "
        f"step (7B: qwen_qlora's batch), mft {args.steps} steps logged every {args.log_every} (median of the "
        f"intervals after the first), baselines {BASELINE_WARMUP} warm-up + {args.baseline_steps} timed steps.\n\n"
    )
    with open(BENCH_DIR / "RESULTS-GPU.md", "a") as f:
        f.write(header + table + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-worker":
        _baseline_worker(sys.argv[2:])
    else:
        main()
