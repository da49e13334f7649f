"""Deprecated name of ``mft_components.training.checkpoint`` (checkpoint files, resume) and
``training.state`` (the recipe state of an exact resume), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.training.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FULL_INDEX,
    FULL_WEIGHTS,
    META_FILE,
    RECORD_KEY,
    STATE_FILE,
    TOKENIZER_FILES,
    CheckpointError,
    ResumeError,
    checkpoint_meta,
    latest_checkpoint,
    list_checkpoints,
    load_adapter,
    load_checkpoint_weights,
    load_recipe_state,
    load_safetensors,
    mkdtemp_umask,
    prune_checkpoints,
    read_checkpoint_meta,
    remove_partial_checkpoints,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from mft_components.training.state import (
    capture_rng_state,
    gather_optimizer_state,
    gather_rank_states,
    gather_training_state,
    load_optimizer_state,
    restore_rng_state,
    restore_training_state,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FULL_INDEX", "FULL_WEIGHTS", "META_FILE", "RECORD_KEY", "STATE_FILE",
           "TOKENIZER_FILES", "CheckpointError", "ResumeError", "checkpoint_meta", "latest_checkpoint",
           "list_checkpoints", "load_adapter", "load_checkpoint_weights", "load_recipe_state", "load_safetensors",
           "mkdtemp_umask", "prune_checkpoints", "read_checkpoint_meta", "remove_partial_checkpoints",
           "resolve_resume", "save_checkpoint", "verify_checkpoint", "capture_rng_state", "gather_optimizer_state",
           "gather_rank_states", "gather_training_state", "load_optimizer_state", "restore_rng_state",
           "restore_training_state"]

warnings.warn("mft_components.checkpoint moved to mft_components.training.checkpoint (checkpoint files, resume) "
              "and mft_components.training.state (the recipe state); import from there", DeprecationWarning,
              stacklevel=2)
