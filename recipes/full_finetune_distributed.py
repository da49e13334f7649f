"""Full-parameter multi-task fine-tuning, one process or many under torchrun (FSDP2).

    mft run full_finetune_distributed --config qwen_full [--nproc-per-node 8] [key=value ...]

Features: everything ``lora_finetune_distributed`` does (multi-task data validated before the model loads,
MFTCoder's task-weighted losses normalised over the whole optimizer step, accumulation, clipping, cosine schedule,
per-task evaluation, CoBa, early stopping, atomic checkpoints, exact resume, metrics), with two differences:

    - Every weight trains (``model.method: full``); FSDP2 shards parameters, gradients and AdamW state per decoder
      layer, and the weights are streamed into the shards.
    - Checkpoints in ``output_dir/step_N`` are Hugging Face model directories (sharded safetensors, config.json,
      tokenizer files; ``transformers`` loads them as they are) plus the recipe state. Resuming builds the model
      straight from the checkpoint directory: one weight load, not two.

The training loop is ``LoRAFinetuneRecipe.train`` (read it in lora_finetune_distributed.py); this file overrides
only what is trained and how it is saved. To change the loop, copy both into one directory (``mft cp
lora_finetune_distributed .`` and ``mft cp full_finetune_distributed .``), edit the loop in the LoRA copy, and
import from it here: ``from lora_finetune_distributed import LoRAFinetuneRecipe, run`` (``mft run`` puts a
recipe's directory first on ``sys.path``, as ``python`` and torchrun do).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mft_components.config import instantiate, parse
from mft_components.distributed import end_worker
from mft_components.models.parallelize import gather_state_dict
from mft_components.recipe_schema import FullRecipeConfig
from mft_recipes.lora_finetune_distributed import LoRAFinetuneRecipe, run

CONFIG_SCHEMA = FullRecipeConfig


class FullFinetuneRecipe(LoRAFinetuneRecipe):
    """Multi-task full fine-tuning: the LoRA recipe's setup and loop, with every weight trainable."""

    METHODS = ("full",)
    OTHER_RECIPE = "lora_finetune_distributed"

    def build_model(self, resume_from: Path | None):
        """The whole model trainable; on resume its weights come from the checkpoint, an HF model directory."""
        weights_dir = {"model_dir": str(resume_from)} if resume_from is not None else {}
        return instantiate(self.cfg.model, dtype=self.cfg.dtype, device=self.device,
                           distributed=self.world_size > 1, **weights_dir)

    def checkpoint_weights(self) -> dict:
        """Every weight, gathered to full tensors on rank 0 one at a time (collective)."""
        return {
            "weights": gather_state_dict(self.model, adapter_only=False),
            "model_config": self.model.config.to_dict(),
            "base_model_dir": self.base_model_dir,
        }

    def load_checkpoint(self, path: Path) -> None:
        """The weights came with the model (``build_model``); restore the recipe state only."""
        self.load_recipe_state(path)


@parse(schema=CONFIG_SCHEMA)
def recipe_main(cfg: DictConfig) -> None:
    run(FullFinetuneRecipe(cfg))


if __name__ == "__main__":
    recipe_main()
    end_worker()
