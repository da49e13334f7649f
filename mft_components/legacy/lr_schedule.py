"""Deprecated name of ``mft_components.training.lr_schedule``, kept for old recipes and for configs whose
``lr_scheduler._component_`` is ``mft_components.lr_schedule.cosine_with_warmup`` (now
``mft_components.training.lr_schedule.cosine_with_warmup``)."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.training.lr_schedule import cosine_with_warmup, lr_factor, resolve_warmup_steps

__all__ = ["cosine_with_warmup", "lr_factor", "resolve_warmup_steps"]

warnings.warn("mft_components.lr_schedule moved to mft_components.training.lr_schedule; import from there (in a "
              "config: _component_: mft_components.training.lr_schedule.cosine_with_warmup)", DeprecationWarning,
              stacklevel=2)
