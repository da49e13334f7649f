"""Losses for multi-task fine-tuning, from the final hidden states to the step's weighted task loss.

    cross_entropy.py   chunked per-token cross entropy (no [tokens, vocab] float32 logits), liger's fused one
    task_weighted.py   TaskWeightedLoss: MFTCoder's modes (token, sample, task, task_sample, coba), exact over
                       the global batch of an optimiser step
    coba.py            CoBa's convergence-balanced task weights

The loss layer sits below models/: ``MFTModel.forward`` computes the chunked cross entropy inside the model's
forward, so that FSDP2 has unsharded ``lm_head`` for it; nothing here imports a model.
"""

from mft_components.loss.cross_entropy import (
    CROSS_ENTROPY_KERNELS,
    IGNORE_INDEX,
    LOSS_INDEX,
    PROJECTION_DTYPES,
    check_label_range,
    chunked_cross_entropy,
    loss_token_index,
)
from mft_components.loss.coba import CoBa
from mft_components.loss.preference import PREFERENCE_LOSSES, PreferenceLoss
from mft_components.loss.task_weighted import (
    LOSS_MODE_ALIASES,
    LOSS_MODES,
    StepCounts,
    TaskWeightedLoss,
    task_loss_sums,
)

__all__ = ["CROSS_ENTROPY_KERNELS", "IGNORE_INDEX", "LOSS_INDEX", "PROJECTION_DTYPES", "check_label_range",
           "chunked_cross_entropy", "loss_token_index", "CoBa", "LOSS_MODE_ALIASES", "LOSS_MODES", "StepCounts",
           "TaskWeightedLoss", "task_loss_sums", "PREFERENCE_LOSSES", "PreferenceLoss"]
