"""GGUF and Ollama export of a Hugging Face export (`mft export ... --gguf [--gguf-type T] [--ollama]`).

The conversion is llama.cpp's own: its ``convert_hf_to_gguf.py`` at a pinned version (``assets/llama_cpp.py``)
runs on the merged Hugging Face directory that ``export.py`` wrote, in a subprocess of this interpreter, so its
per-architecture tensor tables and the ``gguf`` writer of the same commit decide every name and layout; mft maps
no tensor itself. The exported tokenizer's ``chat_template`` (the training format, ``ChatFormat.jinja_chat_template``)
is what the converter writes as ``tokenizer.chat_template``, and ``generation_config.json``'s EOS is the training
EOS. Files added to the export directory::

    OUT/model-f16.gguf     (or -bf16 / -q8_0: llama.cpp's --outtype of the same name)
    OUT/Modelfile          (--ollama) FROM ./model-f16.gguf, TEMPLATE rendering the training format, stop = EOS

``ollama create NAME -f OUT/Modelfile`` then serves the model with the prompt format it was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from mft_components.assets.llama_cpp import (
    LLAMA_CPP_COMMIT,
    LLAMA_CPP_PYTHON_VERSION,
    converter_architectures,
    prepare_llama_cpp_converter,
)
from mft_components.data.templates import ChatFormat
from mft_components.inference.adapters import ExportError
from mft_components.inference.export_args import GGUF_TYPES

__all__ = ["GGUF_TYPES", "MODELFILE", "gguf_file_name", "check_convertible", "convert_to_gguf", "ollama_template",
           "modelfile_text", "export_gguf", "convert_export_dir", "convert_after_export"]

MODELFILE = "Modelfile"
_CHAT_FORMAT_FILE = "mft_chat_format.json"  # export.CHAT_FORMAT_FILE, repeated: export.py imports this module
# The families the README lists as tested, named in a refusal (the converter knows ~280 architecture names).
_TESTED_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                    "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM", "Starcoder2ForCausalLM",
                    "GPTNeoXForCausalLM")
_VERSION = f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (llama.cpp {LLAMA_CPP_COMMIT[:10]})"


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def _converter(converter_dir: Path | None) -> Path:
    if converter_dir is not None:
        return Path(converter_dir)
    try:
        return prepare_llama_cpp_converter()
    except RuntimeError as e:
        raise ExportError(f"--gguf needs llama.cpp's converter from PyPI ({_VERSION}), which could not be "
                          f"fetched: {e}") from None


def check_convertible(export_dir: Path, converter_dir: Path) -> str:
    """The architecture of ``export_dir``'s config.json, after refusing one llama.cpp's converter does not know.

    Raises:
        ExportError: no readable config.json, or an architecture the pinned converter has no class for.
    """
    config_path = export_dir / "config.json"
    try:
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ExportError(f"{config_path}: cannot read the model config ({e})") from None
    known = converter_architectures(converter_dir)
    for arch in architectures:
        if arch in known:
            return arch
    examples = ", ".join(a for a in _TESTED_FAMILIES if a in known)
    raise ExportError(f"{config_path}: architectures {architectures}: llama.cpp's converter ({_VERSION}) cannot "
                      f"convert this model family to GGUF (it converts {examples} and {len(known)} other "
                      f"architecture names); the Hugging Face export is complete without --gguf")


def convert_to_gguf(export_dir: str | Path, out_file: str | Path, gguf_type: str = "f16",
                    converter_dir: str | Path | None = None) -> Path:
    """Run llama.cpp's converter on a Hugging Face model directory; the file appears only once complete.

    Args:
        export_dir: a Hugging Face model directory (``mft export``'s output).
        out_file: the ``.gguf`` file to write (replaced if it exists).
        gguf_type: one of ``GGUF_TYPES`` (llama.cpp's ``--outtype``).
        converter_dir: the unpacked converter (default: ``prepare_llama_cpp_converter()``).

    Returns:
        ``out_file``.

    Raises:
        ExportError: unknown type, an architecture the converter cannot convert, or the converter failed (the
            tail of its log is in the message).
    """
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type: expected one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    export_dir, out_file = Path(export_dir), Path(out_file)
    converter = _converter(None if converter_dir is None else Path(converter_dir))
    check_convertible(export_dir, converter)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(export_dir), "--outtype", gguf_type,
           "--outfile", str(tmp)]
    # The converter prefers the gguf package of its own commit (gguf-py/ beside it) unless NO_LOCAL_GGUF is set.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not tmp.is_file():
            log = (proc.stdout + proc.stderr).strip().splitlines()
            raise ExportError(f"llama.cpp's converter ({_VERSION}) failed on {export_dir} (exit {proc.returncode}):\n"
                              + "\n".join(log[-15:]))
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


# ----------------------------------------------------------------------------------------------------------------
# Ollama
# ----------------------------------------------------------------------------------------------------------------


def ollama_template(chat_format: ChatFormat, eos_token: str) -> str:
    """An Ollama (Go ``text/template``) TEMPLATE that renders ``chat_format``'s text for ``.Messages``.

    Whole conversations render as ``ChatFormat.render_text`` (``eos_token`` written literally after each
    assistant turn, as the training text has it); a conversation that does not end with an assistant turn ends
    with the assistant marker (the generation prompt). Only actions without whitespace trimming (``{{-``) are
    used, so the markers' newlines stay as they are.

    Raises:
        ExportError: ``template: hf`` (a Jinja template of the tokenizer's own; Ollama reads the GGUF's
            ``tokenizer.chat_template`` for the formats it knows), or markers that would break the Modelfile.
    """
    if chat_format.template == "hf":
        raise ExportError("--ollama: this model was trained with template: hf (the tokenizer's own Jinja "
                          "chat_template), which has no Go-template translation here; the GGUF carries it as "
                          "tokenizer.chat_template: use the GGUF directly, or omit --ollama")
    markers, sep = chat_format.role_markers, chat_format._separator
    for what, text in [*((f"role marker {role}", text) for role, text in markers.items()), ("EOS token", eos_token)]:
        if "{{" in text or '"""' in text:
            raise ExportError(f"--ollama: the {what} {text!r} contains '{{{{' or '\"\"\"', which a Modelfile "
                              f"TEMPLATE cannot hold literally")
    turn = "{{ .Content }}" + sep
    return ('{{ $role := "" }}{{ range .Messages }}{{ $role = .Role }}'
            '{{ if eq .Role "system" }}' + markers["system"] + turn
            + '{{ else if eq .Role "user" }}' + markers["user"] + turn
            + '{{ else if eq .Role "assistant" }}' + markers["assistant"] + turn + eos_token + sep
            + '{{ end }}{{ end }}'
            + '{{ if ne $role "assistant" }}' + markers["assistant"] + "{{ end }}")


def modelfile_text(chat_format: ChatFormat, eos_token: str, gguf_name: str) -> str:
    """The Modelfile: the GGUF, the training format as TEMPLATE, and the EOS as the stop sequence."""
    if '"' in eos_token or "\n" in eos_token:
        raise ExportError(f"--ollama: the EOS token {eos_token!r} cannot be written as a Modelfile stop parameter")
    template = ollama_template(chat_format, eos_token)
    return (f"# Written by mft export --ollama: `ollama create NAME -f Modelfile`. The TEMPLATE renders the\n"
            f"# training format ({chat_format.template}); generation stops at the training EOS.\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{template}"""\n'
            f'PARAMETER stop "{eos_token}"\n')


def _read_chat_meta(export_dir: Path) -> tuple[ChatFormat, str | None]:
    path = export_dir / _CHAT_FORMAT_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return ChatFormat.from_config(meta.get("chat_format")), meta.get("eos_token")
    except (OSError, ValueError, AttributeError) as e:
        raise ExportError(f"{path}: cannot read the training format ({e}); export the checkpoint again") from None


def export_gguf(export_dir: str | Path, gguf_type: str = "f16", ollama: bool = False, force: bool = False,
                converter_dir: str | Path | None = None) -> list[Path]:
    """Add a GGUF file (and an Ollama Modelfile) to an mft Hugging Face export.

    Args:
        export_dir: a directory ``mft export`` wrote (holds ``mft_chat_format.json``).
        gguf_type: one of ``GGUF_TYPES``.
        ollama: also write ``Modelfile``.
        force: replace a GGUF / Modelfile an earlier run wrote there.

    Returns:
        The files written.

    Raises:
        ExportError: not an mft export, a file already there without ``force``, or as ``convert_to_gguf``.
    """
    export_dir = Path(export_dir)
    if gguf_type not in GGUF_TYPES:  # before any work, and before the converter is fetched
        raise ExportError(f"--gguf-type: expected one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if not (export_dir / _CHAT_FORMAT_FILE).is_file() or not (export_dir / "config.json").is_file():
        raise ExportError(f"{export_dir}: not a Hugging Face export of mft (expected config.json and "
                          f"{_CHAT_FORMAT_FILE}); pass a training checkpoint with --output, or an mft export directory")
    chat_format, eos_token = _read_chat_meta(export_dir)
    gguf_path = export_dir / gguf_file_name(gguf_type)
    targets = [gguf_path] + ([export_dir / MODELFILE] if ollama else [])
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        raise ExportError(f"{export_dir} already holds {', '.join(existing)}; pass --force to replace")
    modelfile = None
    if ollama:  # refusals of the training format come before the conversion's minutes
        if not eos_token:
            raise ExportError(f"{export_dir / _CHAT_FORMAT_FILE}: no eos_token; --ollama needs it as the stop token")
        modelfile = modelfile_text(chat_format, eos_token, gguf_path.name)
    written = [convert_to_gguf(export_dir, gguf_path, gguf_type, converter_dir)]
    if modelfile is not None:
        (export_dir / MODELFILE).write_text(modelfile, encoding="utf-8")
        written.append(export_dir / MODELFILE)
    return written


# ----------------------------------------------------------------------------------------------------------------
# CLI (`mft export`'s --gguf, --gguf-type, --ollama)
# ----------------------------------------------------------------------------------------------------------------


def convert_export_dir(args: argparse.Namespace) -> bool:
    """`mft export EXPORT_DIR --gguf [--ollama]` (no --output): add to that export and return True; False when the
    arguments ask for something else. Refuses --gguf / --ollama with --adapter-only."""
    if not (args.gguf or args.ollama):
        return False
    if args.adapter_only:
        raise ExportError("--gguf / --ollama convert the merged model; they cannot go with --adapter-only")
    if args.checkpoint_dir is None or not (Path(args.checkpoint_dir) / _CHAT_FORMAT_FILE).is_file():
        return False
    if args.output is not None:
        raise ExportError(f"{args.checkpoint_dir} is an export, not a checkpoint: --gguf / --ollama add to it in "
                          f"place, so drop --output {args.output}")
    for path in export_gguf(args.checkpoint_dir, args.gguf_type, args.ollama, args.force):
        print(f"mft export: wrote {path}")
    return True


def convert_after_export(args: argparse.Namespace, out: Path) -> None:
    """The GGUF (and Modelfile) of the export just written to ``out``, when asked; a failure says that export is
    complete."""
    if not (args.gguf or args.ollama):
        return
    try:
        for path in export_gguf(out, args.gguf_type, args.ollama, force=True):
            print(f"mft export: wrote {path}")
    except ExportError as e:
        raise ExportError(f"{e}\n(the Hugging Face export in {out} is complete; `mft export {out} --gguf` converts it "
                          f"again)") from None
