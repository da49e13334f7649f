"""The multi-task data: task files of JSONL -> validated conversations -> tokens (cached) -> samples, split per
task -> packed rows -> each rank's micro-batches. Data flows one way, down this list:

    records.py    one line -> a validated conversation, or a bad record ``field: problem`` (DataError)
    templates.py  ChatFormat: conversations -> text and token ids with the loss mask; the same prompt at inference
    tasks.py      task directories and files
    tokenize.py   worker processes and a cache keyed by the file bytes, tokenizer, chat format and seq_len
    dataset.py    Sample, MFTData (the samples of every task, train / valid), the per-task split
    packing.py    samples -> rows of seq_len tokens (best-fit decreasing, or one sample per row), the batch dict
    sampling.py   task-balanced, distributed, resumable loaders: build_train_loader(data), build_valid_loader(data)
    build.py      build_mft_data, the ``data:`` node's builder: every option checked before a record is read
    stats.py      per-task statistics and their table
    report.py     the ``mft data`` command
    preference_records.py, preference.py   preference pairs (the preference recipe's data): shapes, pairs, rows

The names of the flat ``data.py`` this package replaced are all here.
"""

from mft_components.data.records import DataError, parse_prompt_rounds, parse_record
from mft_components.data.templates import ChatFormat
from mft_components.data.tasks import discover_tasks
from mft_components.data.tokenize import TRUNCATION_MODES, tokenizer_fingerprint
from mft_components.data.dataset import MFTData, Sample
from mft_components.data.packing import PACKING_MODES, collate, pack_samples
from mft_components.data.sampling import TASK_SAMPLING_MODES, LoaderStateError, build_train_loader, build_valid_loader
from mft_components.data.build import BAD_RECORD_MODES, build_mft_data, resolve_data_config
from mft_components.data.stats import STAT_KEYS, format_stats, task_stats, total_stats
from mft_components.data.preference import PreferenceData, build_preference_data

__all__ = ["DataError", "parse_prompt_rounds", "parse_record", "ChatFormat", "discover_tasks", "TRUNCATION_MODES",
           "tokenizer_fingerprint", "MFTData", "Sample", "PACKING_MODES", "collate", "pack_samples",
           "TASK_SAMPLING_MODES", "LoaderStateError", "build_train_loader", "build_valid_loader", "BAD_RECORD_MODES",
           "build_mft_data", "resolve_data_config", "STAT_KEYS", "format_stats", "task_stats", "total_stats",
           "PreferenceData", "build_preference_data"]
