"""The model of a training step: a transformers causal LM that returns per-token losses, and its batches.

``MFTModel.forward(batch)`` runs the decoder and the chunked cross entropy against ``lm_head`` inside one forward,
so FSDP2's root unshards ``lm_head`` for the loss and no [B, T, V] float32 logits are ever built.
``prepare_batch`` moves a collated micro-batch to the device with what that forward needs from the host (the loss
tokens' positions, the attention's boundaries), so a GPU never waits for the host to read a value back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mft_components.device import to_device
from mft_components.loss.cross_entropy import LOSS_INDEX, check_label_range, chunked_cross_entropy, loss_token_index
from mft_components.models.attention import attention_kwargs  # importing it registers mft's attention functions
from mft_components.models.moe import num_experts, router_aux_loss

__all__ = ["MFTModel", "ATTENTION_INPUTS", "prepare_batch", "decoder_layers"]


class MFTModel(nn.Module):
    """A transformers causal LM plus the loss: `forward(batch) -> (token_losses, aux_loss)`.

    Attributes:
        hf_model: the transformers `*ForCausalLM` (LoRA / NF4 modules inside; FSDP2-sharded when distributed).
        method: "full", "lora" or "qlora".
        lora_config: dict(rank, alpha, dropout, target_modules, use_rslora) or None for full fine-tuning.
        model_dir: the directory the weights came from.
    """

    def __init__(self, hf_model: nn.Module, method: str, lora_config: dict | None, model_dir: str | Path):
        super().__init__()
        self.hf_model = hf_model
        self.method = method
        self.lora_config = lora_config
        self.model_dir = str(model_dir)
        self.attn_implementation = getattr(hf_model.config, "_attn_implementation", None)
        self.compile_scope = "off"  # build_model records what it compiled (parallelize.COMPILE_SCOPES)
        self.compile_watch = None  # and whether it ran compiled (parallelize.CompileWatch, reported after a step)

    @property
    def config(self):
        return self.hf_model.config

    def decoder(self) -> nn.Module:
        """The decoder stack without the LM head (`LlamaModel`, `GPTNeoXModel`, ...)."""
        return self.hf_model.base_model

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers (the unit of FSDP2 sharding and activation checkpointing)."""
        return decoder_layers(self.hf_model)

    def forward(self, batch: dict, chunk_size: int = 1024, projection_dtype: str = "model",
                cross_entropy: str = "chunked") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token losses of the batch's loss-carrying tokens, and the MoE load-balancing loss.

        Args:
            batch: collator output (input_ids, labels already shifted, position_ids, optional attention_mask,
                sample_ids); tensors on the model's device. A batch from `prepare_batch` also carries the
                attention's inputs and the loss tokens' positions, computed on the host.
            chunk_size: tokens projected onto the vocabulary at once by the chunked cross-entropy.
            projection_dtype: ``model`` or ``float32``, the dtype of that projection (see `chunked_cross_entropy`).
            cross_entropy: ``chunked`` or ``liger`` (``loss.cross_entropy``).

        Returns:
            (token_losses float32 [N] for labels != -100 in row-major order, aux_loss scalar or None).
        """
        config = self.hf_model.config
        moe = num_experts(config) is not None
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        if moe:
            kwargs["output_router_logits"] = True
        # the attention's per-micro-batch inputs (segments, BlockMask, cu_seqlens): prepared, or computed here
        attention = batch.get(ATTENTION_INPUTS)
        kwargs.update(attention if attention is not None else attention_kwargs(batch, config))
        out = self.decoder()(**kwargs)
        hidden = out.last_hidden_state
        hidden = hidden * _logit_multiplier(config) if _logit_multiplier(config) != 1.0 else hidden
        weight = self.hf_model.get_output_embeddings().weight
        token_losses = chunked_cross_entropy(
            hidden, weight, batch["labels"], chunk_size, softcap=getattr(config, "final_logit_softcapping", None),
            projection_dtype=projection_dtype, loss_index=batch.get(LOSS_INDEX), kernel=cross_entropy,
        )
        aux = None
        router_logits = getattr(out, "router_logits", None) if moe else None
        if router_logits:
            sample_ids = batch.get("sample_ids")
            mask = None if sample_ids is None else sample_ids >= 0
            aux = router_aux_loss(router_logits, num_experts(config), config.num_experts_per_tok, mask)
        return token_losses, aux


    def generate(self, *args, **kwargs):
        """transformers' ``generate`` on the decoder and its LM head, called through this root module so that under
        FSDP2 (which registers it as a forward method) the root's parameters (embeddings, final norm, ``lm_head``)
        are gathered first, as for ``forward``."""
        return self.hf_model.generate(*args, **kwargs)


# Batch key of the attention's inputs computed by `prepare_batch` (a dict of decoder keyword arguments).
ATTENTION_INPUTS = "attention_inputs"


def prepare_batch(batch: dict, device: torch.device, config) -> dict:
    """A collated micro-batch on ``device``, with what the forward would otherwise read back from the device.

    The tensors are copied with ``non_blocking=True`` (asynchronous from the pinned memory the loader uses on
    CUDA). Before they leave the host, the loss tokens' positions (``LOSS_INDEX``) and the attention backend's
    boundaries (segment lengths, cu_seqlens) are computed from the host copy, and the labels are range-checked:
    on a GPU, the forward then never waits for the device, so the host queues the next kernels while the
    device computes. A flex_attention BlockMask is built on the device right after the copy.

    Args:
        batch: collator output on the host (``input_ids``, ``labels``, ``position_ids``, ``sample_ids``,
            ``task_ids``).
        device: the model's device.
        config: the transformers config of the model (``_attn_implementation``, ``vocab_size``).

    Returns:
        The batch's tensors on ``device`` plus ``LOSS_INDEX`` and ``ATTENTION_INPUTS``.

    Raises:
        ValueError: a label outside the vocabulary, or what the attention backend rejects.
    """
    index = loss_token_index(batch["labels"])
    check_label_range(batch["labels"].reshape(-1)[index], config.vocab_size)
    moved = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    moved[LOSS_INDEX] = to_device(index, device)
    moved[ATTENTION_INPUTS] = attention_kwargs(moved, config, host_batch=batch)
    return moved


def _logit_multiplier(config) -> float:
    """Architectures that scale logits (Cohere's logit_scale, Granite's logits_scaling) scale the hidden state."""
    if getattr(config, "logit_scale", None):
        return float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        return 1.0 / float(config.logits_scaling)
    return 1.0


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a transformers causal LM.

    Raises:
        ValueError: no `layers` / `h` / `blocks` ModuleList on the base model.
    """
    base = hf_model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(hf_model).__name__}: cannot find the decoder layers (expected base_model.layers / .h)")
