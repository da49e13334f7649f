"""Many recipe configurations in one process (or one torchrun launch), launched by tests/test_recipes.py.

    python tests/dist/batch_split_matrix.py CONFIG OUT_ROOT                  one rank
    torchrun --nproc-per-node 2 tests/dist/batch_split_matrix.py CONFIG OUT_ROOT

For every packing x loss mode x micro_batch_size x gradient_accumulation_steps of ``MATRIX``, the LoRA recipe is
built from CONFIG in this process and trained (``max_steps`` of CONFIG), its checkpoint written to
``OUT_ROOT/<packing>-<mode>-w<ranks>-m<mbs>-g<gas>/``. The process group (under torchrun) is made once and kept
across the configurations; each recipe sets up, trains and closes its logs as ``run`` does, but leaves the group.
A configuration that fails ends the process with its traceback, so the launch fails.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import runpy
import sys
from pathlib import Path

from mft_components.config import fill_defaults, load_config
from mft_components.distributed import destroy_distributed, end_worker, get_rank, get_world_size, init_distributed
from mft_components.models import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
MATRIX = {
    "packing": ("pack", "padding"),
    "mode": ("token", "sample", "task", "task_sample", "coba"),
    "micro_batch_size": (1, 2, 3),
    "gradient_accumulation_steps": (1, 2, 4),
}


@functools.cache
def cached_tokenizer(path: str):
    """The config's tokenizer, loaded once for all configurations (half of a recipe's setup time otherwise)."""
    return load_tokenizer(path)


def run_name(packing: str, mode: str, world: int, mbs: int, gas: int) -> str:
    return f"{packing}-{mode}-w{world}-m{mbs}-g{gas}"


def run_matrix(config: str, out_root: str) -> list[str]:
    """Train every configuration of ``MATRIX`` on this process group (or none); returns the run names."""
    module = runpy.run_path(str(REPO_ROOT / "recipes" / "lora_finetune_distributed.py"), run_name="mft_matrix")
    recipe_class, schema = module["LoRAFinetuneRecipe"], module["CONFIG_SCHEMA"]
    init_distributed()
    world = get_world_size()
    names = []
    for packing, mode, mbs, gas in itertools.product(*MATRIX.values()):
        name = run_name(packing, mode, world, mbs, gas)
        cfg = load_config(config, [f"output_dir={Path(out_root) / name}", f"data.packing={packing}",
                                   f"loss.mode={mode}", f"micro_batch_size={mbs}", f"gradient_accumulation_steps={gas}",
                                   f"tokenizer._component_={__name__}.cached_tokenizer"])
        fill_defaults(cfg, schema)
        recipe = recipe_class(cfg)
        with contextlib.redirect_stdout(io.StringIO()):  # 90 configs' worth of config dumps and summaries
            recipe.setup()
            recipe.train()
        recipe.logger.close()
        recipe.progress.close()
        names.append(name)
    return names


if __name__ == "__main__":
    done = run_matrix(sys.argv[1], sys.argv[2])
    if get_rank() == 0:
        print(f"MATRIX OK {len(done)} runs on {get_world_size()} rank(s)", flush=True)
    destroy_distributed()
    end_worker()
