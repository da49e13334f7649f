"""Deprecated name of what ``mft_components.metrics`` held, now in ``mft_components.training``: metrics (logger,
progress bar, throughput), guards (early stopping, non-finite guard), evaluate (validation), summary; kept for old
recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.device import peak_memory_gb
from mft_components.training.evaluate import EvalResult, Evaluator, evaluate
from mft_components.training.guards import EarlyStopping, NonFiniteGuard, NonFiniteLossError, check_finite
from mft_components.training.metrics import MetricLogger, ProgressBar, Throughput
from mft_components.training.summary import format_summary

__all__ = ["EvalResult", "Evaluator", "evaluate", "EarlyStopping", "NonFiniteGuard", "NonFiniteLossError",
           "check_finite", "MetricLogger", "ProgressBar", "Throughput", "format_summary", "peak_memory_gb"]

warnings.warn("mft_components.metrics moved to mft_components.training (metrics, guards, evaluate, summary) and "
              "mft_components.device (peak_memory_gb); import from there", DeprecationWarning, stacklevel=2)
