"""Names that left a module which kept its own name, put back as deprecated names by every legacy shim.

The flat modules that became packages or stayed (``distributed``, ``loss``, ``data``) lost some names to the layers:

    mft_components.distributed.gather_state_dict, shard_model, ...   now in mft_components.models.parallelize
    mft_components.loss.router_aux_loss                               now in mft_components.models.moe
    MFTData.train_loader / valid_loader                               now data.sampling.build_train_loader(data, ...),
                                                                      build_valid_loader(data, ...)
    MFTData.stats / total_stats / format_stats                        now data.stats.task_stats(data), ...

A lower module cannot import these back (layers only import downwards), so this module, in the top layer, puts them
on the lower modules when any old module name is imported: a recipe copied with ``mft cp`` before the layered layout
imports ``mft_components.checkpoint`` (a shim) first. Each of them warns when it is used.
"""

import functools
import warnings

import mft_components.distributed as _distributed
import mft_components.loss as _loss
from mft_components.data.dataset import MFTData
from mft_components.data.sampling import build_train_loader, build_valid_loader
from mft_components.data.stats import format_stats, task_stats, total_stats
from mft_components.models import moe, parallelize

__all__ = ["deprecated"]


def deprecated(function, old: str, new: str):
    """``function`` under its old name ``old``: each call warns (DeprecationWarning) that it is now ``new``."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    return wrapper


for _name in ("gather_state_dict", "shard_model", "reshard", "make_param_like", "apply_activation_checkpointing",
              "activation_checkpointing_mode", "resolve_compile", "compile_layers"):
    setattr(_distributed, _name, deprecated(getattr(parallelize, _name), f"mft_components.distributed.{_name}",
                                            f"mft_components.models.parallelize.{_name}"))
_distributed.ACTIVATION_CHECKPOINTING = parallelize.ACTIVATION_CHECKPOINTING
_distributed.COMPILE_SCOPES = parallelize.COMPILE_SCOPES
_loss.router_aux_loss = deprecated(moe.router_aux_loss, "mft_components.loss.router_aux_loss",
                                   "mft_components.models.moe.router_aux_loss")


# MFTData's loaders were methods; the loaders now take the dataset (data -> packing -> sampling, one way).
def _train_loader(self, micro_batch_size: int, gradient_accumulation_steps: int = 1, rank: int = 0,
                  world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
    return build_train_loader(self, micro_batch_size=micro_batch_size,
                              gradient_accumulation_steps=gradient_accumulation_steps, rank=rank,
                              world_size=world_size, num_workers=num_workers, pin_memory=pin_memory)


def _valid_loader(self, micro_batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                  pin_memory: bool = False):
    return build_valid_loader(self, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                              num_workers=num_workers, pin_memory=pin_memory)


MFTData.train_loader = deprecated(_train_loader, "mft_components.data.MFTData.train_loader(...)",
                                  "mft_components.data.sampling.build_train_loader(data, ...)")
MFTData.valid_loader = deprecated(_valid_loader, "mft_components.data.MFTData.valid_loader(...)",
                                  "mft_components.data.sampling.build_valid_loader(data, ...)")
MFTData.stats = property(deprecated(task_stats, "mft_components.data.MFTData.stats",
                                    "mft_components.data.stats.task_stats(data)"))
MFTData.total_stats = property(deprecated(lambda self: total_stats(task_stats(self)),
                                          "mft_components.data.MFTData.total_stats",
                                          "mft_components.data.stats.total_stats(task_stats(data))"))
MFTData.format_stats = deprecated(lambda self: format_stats(task_stats(self)),
                                  "mft_components.data.MFTData.format_stats()",
                                  "mft_components.data.stats.format_stats(task_stats(data))")
