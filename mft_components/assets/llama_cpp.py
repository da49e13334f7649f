"""llama.cpp's own Hugging Face -> GGUF converter at a pinned version, from PyPI only (`mft export --gguf`).

llama.cpp publishes no wheel of its converter, and the ``gguf`` wheel on PyPI lags the converter it must match
(``gguf`` 0.19.0 on PyPI lacks ``LazyChunkedTensor``, which the converter of the same release calls). The
``llama-cpp-python`` source distribution vendors llama.cpp whole; ``prepare_llama_cpp_converter`` downloads that
sdist once with pip (hash-checked: ``--require-hashes``, then checked again here), and unpacks only what the
converter runs on into the cache (``cache.py``)::

    MFT_CACHE/llama-cpp-converter-0.3.36/
      convert_hf_to_gguf.py        the converter script (sha256 pinned below)
      conversion/                  its per-architecture classes (llama.cpp's table of tensor names)
      gguf-py/gguf/                the gguf package of the same commit (the converter puts it first on sys.path)
      LICENSE                      llama.cpp's MIT licence
      architectures.json           the ``architectures`` names the converter has a class for

Nothing is built (building llama-cpp-python compiles llama.cpp: ~25 minutes); the converter runs with this
environment's torch, numpy, sentencepiece and transformers. ``make gguf`` fills the cache ahead of time.
"""

from __future__ import annotations

import ast
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from mft_components.assets.cache import MARKER, build_atomically, cache_root, file_sha256, run_pip

__all__ = ["LLAMA_CPP_PYTHON_VERSION", "LLAMA_CPP_COMMIT", "prepare_llama_cpp_converter", "converter_architectures"]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # the llama.cpp submodule of that sdist
_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_CONVERTER_SHA256 = "e9a1da876330bbce9687541ab31736542a01b4ac43c6686126514a50f122fb7f"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
_ARCHITECTURES = "architectures.json"  # what the converter registers, listed when the cache is filled


def _download_sdist(into: Path) -> Path:
    requirement = into / "requirements.txt"
    requirement.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --hash=sha256:{_SDIST_SHA256}\n")
    print(f"mft: fetching llama.cpp's converter: `pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}` "
          f"(source only, ~75 MB, nothing is built)", file=sys.stderr)
    run_pip("download", "--no-deps", "--no-binary", ":all:", "--require-hashes", "-r", str(requirement),
            "-d", str(into))
    sdist = into / _SDIST
    if not sdist.is_file() or file_sha256(sdist) != _SDIST_SHA256:
        raise RuntimeError(f"{sdist}: missing or not the pinned sdist (sha256 {_SDIST_SHA256})")
    return sdist


def prepare_llama_cpp_converter(cache_dir: str | Path | None = None) -> Path:
    """The cached directory holding llama.cpp's ``convert_hf_to_gguf.py`` at the pinned version.

    Args:
        cache_dir: cache root (default ``$MFT_CACHE`` or ``~/.cache/mft``).

    Returns:
        The directory (see the module docstring for its layout).

    Raises:
        RuntimeError: pip cannot fetch the sdist (offline, no PyPI), or a file is not the pinned one.
    """
    final = cache_root(cache_dir) / f"llama-cpp-converter-{LLAMA_CPP_PYTHON_VERSION}"
    if (final / MARKER).exists():
        return final

    def build(tmp: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix="mft-llama-cpp-sdist-") as download:
            sdist = _download_sdist(Path(download))
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(_VENDOR)
                           and m.name[len(_VENDOR):].startswith(_KEEP)]
                for m in members:
                    m.name = m.name[len(_VENDOR):]
                # The "data" filter (no links out, no devices) where this Python has it (3.10.12+, 3.11.4+).
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **safe)
        if file_sha256(tmp / "convert_hf_to_gguf.py") != _CONVERTER_SHA256:
            raise RuntimeError(f"{sdist}: convert_hf_to_gguf.py is not the pinned file (sha256 {_CONVERTER_SHA256})")
        (tmp / _ARCHITECTURES).write_text(json.dumps(_registered_architectures(tmp)) + "\n")
        return {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "llama_cpp_commit": LLAMA_CPP_COMMIT,
                "sdist_sha256": _SDIST_SHA256}

    return build_atomically(final, build)


def _registered_architectures(converter_dir: Path) -> list[str]:
    names: set[str] = set()
    for path in sorted((converter_dir / "conversion").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register":
                names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return sorted(names)


def converter_architectures(converter_dir: Path) -> set[str]:
    """The Hugging Face ``architectures`` names the converter registers (``@ModelBase.register("X", ...)``),
    read from its source without importing it (that imports torch and transformers: seconds); parsed once, when
    the cache is filled (``architectures.json``)."""
    listed = converter_dir / _ARCHITECTURES
    if listed.is_file():
        return set(json.loads(listed.read_text(encoding="utf-8")))
    return set(_registered_architectures(converter_dir))
