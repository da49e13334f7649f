"""Generate with a fine-tuned model using the exact training prompt format (`mft generate`).

The prompt is built by the same code that rendered the training data, `ChatFormat.prompt_ids` (history + user turn,
ending with the assistant marker), so the model sees at inference what it saw in training. The format comes from

    MODEL_OR_ADAPTER/mft_chat_format.json   written by `mft export` (the exported dir and its adapter/)
    MODEL_OR_ADAPTER/mft_checkpoint.json    a training checkpoint (output_dir/step_N/)

Two ways to get a model:

    mft generate --model OUT                              an exported directory
    mft generate --model BASE --adapter output/step_N     the base + a LoRA / QLoRA checkpoint's adapter, merged in
                                                          float32 by the same code as `mft export`
    mft generate --model BASE --adapter DIR --template mft   an adapter trained elsewhere (peft, MFTCoder; an older
                                                          adapter_model.bin too): --template names its format

Generation uses `transformers`' `generate`, stops at the training EOS and prints only the new text. With
`--file PROMPTS.jsonl` each line is `{"prompt": "..."}` or `{"messages": [...]}` (optionally `"system"`) and the
output is one JSON line per input: the input record plus `"response"`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mft_components.data.templates import ChatFormat
from mft_components.inference.adapters import (ExportError, merge_lora_tensor, merge_planned, plan_param_merges,
                                                read_adapter)
from mft_components.inference.decoding import generate_batched
from mft_components.inference.export import CHAT_FORMAT_FILE, remote_code_refused
from mft_components.inference.generate_args import add_arguments
from mft_components.inference.shards import OUTPUT_DTYPES
from mft_components.models.weights import safetensors_files, safetensors_problem
from mft_components.training.checkpoint import ADAPTER_CONFIG, CheckpointError, read_checkpoint_meta, verify_checkpoint
from mft_components.training.checkpoint import META_FILE as CHECKPOINT_META

__all__ = ["GenerateError", "GenerationModel", "Generation", "load_generation_model", "merge_adapter_into",
           "generate", "read_prompt_file", "add_arguments", "run"]

_ROLES = ("system", "user", "assistant")


class GenerateError(ValueError):
    """Bad model/adapter directory or prompt file; the message says what and where."""


@dataclass
class GenerationModel:
    """What `generate` needs: the HF model, its tokenizer, the training chat format and EOS id."""

    model: torch.nn.Module
    tokenizer: object
    chat_format: ChatFormat
    eos_token_id: int


@dataclass
class Generation:
    """One answer: `text` is the decoded new tokens before the EOS; `finished` is True when the EOS was produced."""

    text: str
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    finished: bool = False


def _read_chat_meta(dirs: list[Path]) -> tuple[dict | None, str | None, Path]:
    """(chat_format dict, eos token, file) from the first dir holding mft_chat_format.json or mft_checkpoint.json."""
    for d in dirs:
        for name in (CHAT_FORMAT_FILE, CHECKPOINT_META):
            p = d / name
            if p.is_file():
                try:
                    meta = json.loads(p.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise GenerateError(f"{p}: not valid JSON ({e}); the file is damaged") from e
                if not isinstance(meta, dict):
                    raise GenerateError(f"{p}: expected a JSON object")
                return meta.get("chat_format"), meta.get("eos_token"), p
    raise GenerateError(f"no training chat format found in {', '.join(map(str, dirs))} (expected {CHAT_FORMAT_FILE} "
                        f"from `mft export` or {CHECKPOINT_META} from a training checkpoint)")


def _tokenizer_dir(model_dir: Path, adapter_dir: Path | None) -> Path:
    candidates = [model_dir] + ([adapter_dir] if adapter_dir else [])
    if (model_dir / CHECKPOINT_META).is_file():  # a full checkpoint used directly as --model
        base = read_checkpoint_meta(model_dir).get("base_model_dir")
        candidates += [Path(base)] if base else []
    for c in candidates:
        if (c / "tokenizer_config.json").is_file() or (c / "tokenizer.json").is_file():
            return c
    raise GenerateError(f"no tokenizer in {', '.join(map(str, candidates))} (expected tokenizer_config.json)")


def merge_adapter_into(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Merge a PEFT-format LoRA adapter into `model`'s float32 weights in place (`W += scale * B @ A`), as `mft
    export` does: the tensors it trained in place of the base's (biases, `modules_to_save`) replace them, and
    `fan_in_fan_out` targets (GPT-2's Conv1D) take the transposed update.

    Raises:
        GenerateError: the adapter targets a module the model does not have, or a shape does not fit.
    """
    adapter = read_adapter(adapter_dir)
    where = Path(adapter_dir) / ADAPTER_CONFIG
    names_of: dict[int, list[str]] = {}  # tied parameters (lm_head = embed_tokens) have several names
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    with torch.no_grad():
        for name, tensor in adapter.replaced.items():
            try:
                param = model.get_parameter(name)
            except AttributeError as e:
                raise GenerateError(f"{where}: the adapter holds {name}, which the model has not; is --model the "
                                    f"base the adapter was trained on?") from e
            tied = [n for n in names_of[id(param)] if n != name]
            if tied:  # copying it in would change the tied tensor too (mft export refuses this adapter as well)
                raise GenerateError(f"{where}: the adapter holds its own {name}, which this model ties to "
                                    f"{', '.join(tied)}; merging it would replace both")
            if param.shape != tensor.shape:
                raise GenerateError(f"{where}: the adapter holds {name} {tuple(tensor.shape)}, the model has "
                                    f"{tuple(param.shape)}; is --model the base the adapter was trained on?")
            param.copy_(tensor)
        # fused MoE experts / routers: the adapter's target_parameters, MFTCoder's per-expert w1 / w2 / w3
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        try:
            plan = plan_param_merges(adapter, shapes, _LoadedLayout(model))
        except ExportError as e:
            raise GenerateError(f"{where}: {e}") from e
        for name, entries in plan.items():
            param = model.get_parameter(name)
            param.copy_(merge_planned(param, entries, adapter.scale, name))
        for path, (a, b) in adapter.pairs.items():
            try:
                linear = model.get_submodule(path)
            except AttributeError as e:
                raise GenerateError(f"{where}: the adapter targets {path}, which the "
                                    f"model has not; is --model the base the adapter was trained on?") from e
            merged = merge_lora_tensor(linear.weight, a, b, adapter.scale, f"{path}.weight", adapter.fan_in_fan_out)
            linear.weight.copy_(merged)


class _LoadedLayout:
    """``expert_lora.ExpertLayout`` of a loaded model: parameters are named as in memory."""

    def __init__(self, model: torch.nn.Module):
        self.transposed = {f"{path}.{n}" for path, m in model.named_modules() if getattr(m, "is_transposed", False)
                           for n, p in m.named_parameters(recurse=False) if p.ndim == 3}

    @staticmethod
    def source(key: str):
        return key, None, 1, None


def load_generation_model(model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "fp32",
                          device: str | torch.device | None = None, trust_remote_code: bool = False,
                          default_chat_format: dict | None = None) -> GenerationModel:
    """Load an exported directory, or a base model plus a checkpoint's LoRA adapter merged in float32.

    Args:
        model_dir: an `mft export` output, a HF model directory (with `adapter`), or a full checkpoint.
        adapter: a LoRA / QLoRA checkpoint (`output_dir/step_N/`) or an exported `adapter/` directory.
        dtype: "fp32" | "bf16" | "fp16" for inference (the merge runs in float32 first).
        device: where to run (default cuda when available, else cpu).
        trust_remote_code: let `transformers` run Python code shipped with the model or tokenizer (never asked).
        default_chat_format: the chat format (``ChatFormat.from_config``) of a model that has no training one (a
            base model); None refuses such a model.

    Returns:
        GenerationModel.

    Raises:
        GenerateError: missing directories, chat format, tokenizer or EOS; adapter that does not fit the model;
            a model or tokenizer with its own code and no `trust_remote_code`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    adapter_dir = Path(adapter) if adapter is not None else None
    for d, what in ((model_dir, "--model"), (adapter_dir, "--adapter")):
        if d is not None and not d.is_dir():
            raise GenerateError(f"{what} {d}: directory does not exist")
    if adapter_dir is not None and not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise GenerateError(f"--adapter {adapter_dir}: no {ADAPTER_CONFIG}; expected a LoRA/QLoRA checkpoint or an "
                            f"exported adapter/ directory (a full checkpoint is passed as --model)")
    if adapter_dir is not None and (model_dir / CHAT_FORMAT_FILE).is_file() and (model_dir / "adapter").is_dir():
        # An `mft export` directory already holds the merged weights: adding its adapter again would double it.
        raise GenerateError(f"--model {model_dir} is an exported model with the adapter already merged; drop "
                            f"--adapter, or pass the base model as --model")
    if dtype not in OUTPUT_DTYPES:
        raise GenerateError(f"dtype: expected one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    for d in ([adapter_dir] if adapter_dir else []) + [model_dir]:
        if (d / CHECKPOINT_META).is_file():  # a training checkpoint: its files must match their record, as export
            try:                              # checks (a bit-flipped adapter would be used silently)
                verify_checkpoint(d)
            except CheckpointError as e:
                raise GenerateError(f"damaged checkpoint: {e}") from e
    try:
        chat_dict, eos_token, meta_path = _read_chat_meta(([adapter_dir] if adapter_dir else []) + [model_dir])
    except GenerateError as e:
        if default_chat_format is None or not str(e).startswith("no training chat format"):  # damaged: say so
            raise
        chat_dict, eos_token, meta_path = default_chat_format, None, model_dir
    chat_format = ChatFormat.from_config(chat_dict)

    tokenizer_dir = _tokenizer_dir(model_dir, adapter_dir)
    with _refusing_remote_code(tokenizer_dir, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    eos_token = eos_token or tokenizer.eos_token
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or (eos_id == tokenizer.unk_token_id and eos_token != tokenizer.unk_token):
        raise GenerateError(f"{meta_path}: eos_token {eos_token!r} is not in the tokenizer's vocabulary")

    try:
        weight_files = safetensors_files(model_dir)
    except FileNotFoundError:
        weight_files = []  # transformers reads other layouts, and says what it misses
    for problem in filter(None, map(safetensors_problem, weight_files)):
        raise GenerateError(f"--model {problem}")
    # Load in float32 so that an adapter merge is exact, then cast.
    with _refusing_remote_code(model_dir, "model"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        try:
            merge_adapter_into(model, adapter_dir)
        except ExportError as e:
            raise GenerateError(str(e)) from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device=device, dtype=OUTPUT_DTYPES[dtype]).eval()
    return GenerationModel(model=model, tokenizer=tokenizer, chat_format=chat_format, eos_token_id=eos_id)


@contextlib.contextmanager
def _refusing_remote_code(directory: Path, what: str):
    """transformers' refusal of untrusted custom code (a ValueError) as a GenerateError that says what to do."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise GenerateError(remote_code_refused(directory, what)) from e
        raise


def to_messages(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    """A user prompt (or a message list ending with a user turn) plus an optional system prompt -> messages."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


@torch.no_grad()
def generate(gm: GenerationModel, prompt: str | list[dict], *, system: str | None = None, max_new_tokens: int = 512,
             greedy: bool = False, temperature: float = 0.7, top_p: float = 0.95,
             eos_token_id: int | None = None) -> Generation:
    """Answer one prompt with the training prompt format.

    Args:
        gm: from `load_generation_model`.
        prompt: the user's text, or a list of `{"role", "content"}` messages ending with a user turn.
        system: a system prompt (ignored when `prompt` already starts with one).
        max_new_tokens: generation budget.
        greedy: argmax decoding; otherwise sample with `temperature` and `top_p`.
        eos_token_id: stop token; default the training EOS.

    Returns:
        Generation (the text excludes the prompt and the EOS).

    Raises:
        GenerateError: roles other than system/user/assistant, or the conversation does not end with a user turn.
    """
    messages = to_messages(prompt, system)
    for i, m in enumerate(messages):
        if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise GenerateError(f"message {i}: expected {{'role': one of {_ROLES}, 'content': str}}, got {m!r}")
    if not messages or messages[-1]["role"] != "user":
        raise GenerateError("the conversation must end with a user turn (the model answers it)")
    eos = gm.eos_token_id if eos_token_id is None else eos_token_id
    prompt_ids = list(gm.chat_format.prompt_ids(messages, gm.tokenizer))
    # The batched generation code evaluation runs inside training, for one prompt, on torch's threads (code
    # evaluation's one-thread default was measured on shared cores, not for a person's own machine).
    pad = gm.model.generation_config.pad_token_id
    out = generate_batched(gm.model, [prompt_ids], eos_token_id=eos, max_new_tokens=max_new_tokens, greedy=greedy,
                           temperature=temperature, top_p=top_p, pad_token_id=pad, cpu_threads=None)[0]
    new_ids, finished = out.new_ids, out.finished
    text = gm.tokenizer.decode(new_ids, skip_special_tokens=False)
    return Generation(text=text, prompt_ids=prompt_ids, new_ids=new_ids, finished=finished)


def read_prompt_file(path: str | Path) -> list[dict]:
    """Records of a prompts JSONL: each has `prompt` (str) or `messages` (list), optionally `system`.

    Raises:
        GenerateError: `path:line: problem` for the first bad line.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerateError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(rec, dict) or not (isinstance(rec.get("prompt"), str)
                                                 or isinstance(rec.get("messages"), list)):
                raise GenerateError(f"{path}:{lineno}: expected an object with 'prompt' (string) or 'messages' "
                                    f"(list of {{role, content}})")
            records.append(rec)
    return records


def run(args: argparse.Namespace) -> int:
    """Run `mft generate`; returns the exit status (errors for people go to stderr, status 2)."""
    try:
        records = read_prompt_file(args.file) if args.file else None
        try:
            gm = load_generation_model(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                       trust_remote_code=args.trust_remote_code,
                                       default_chat_format={"template": args.template} if args.template else None)
        except GenerateError as e:
            if args.template is None and str(e).startswith("no training chat format"):  # say how to prompt it
                raise GenerateError(f"{e}; for a model or adapter mft did not train (an MFTCoder adapter), pass "
                                    "--template mft (MFTCoder's markers), mftcoder_atorch or hf (the tokenizer's "
                                    "chat_template)") from None
            raise
        if args.seed is not None:
            torch.manual_seed(args.seed)
        kwargs = dict(system=args.system, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                      temperature=args.temperature, top_p=args.top_p)
        if records is None:
            print(generate(gm, args.prompt, **kwargs).text)
            return 0
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for rec in records:
                g = generate(gm, rec.get("messages") or rec["prompt"], **{**kwargs, "system": rec.get("system",
                                                                                                 args.system)})
                out.write(json.dumps({**rec, "response": g.text}, ensure_ascii=False) + "\n")
                out.flush()
        finally:
            if out is not sys.stdout:
                out.close()
    except (GenerateError, ExportError) as e:
        print(f"mft generate: error: {e}", file=sys.stderr)
        return 2
    return 0
