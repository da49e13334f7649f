"""Preference runs of several batch splits in one process (or one torchrun launch), for
tests/test_preference_recipe.py.

    python tests/dist/preference_split_matrix.py CONFIG OUT_ROOT SPLITS               one rank
    torchrun --nproc-per-node 2 tests/dist/preference_split_matrix.py CONFIG OUT_ROOT SPLITS

SPLITS: ``mode:mbs:gas,...``; each is trained from CONFIG into ``OUT_ROOT/<mode>-w<ranks>-m<mbs>-g<gas>/``.
"""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
from pathlib import Path

from mft_components.config import fill_defaults, load_config
from mft_components.distributed import destroy_distributed, end_worker, get_rank, get_world_size, init_distributed

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_splits(config: str, out_root: str, splits: str) -> list[str]:
    module = runpy.run_path(str(REPO_ROOT / "recipes" / "preference_finetune_distributed.py"), run_name="mft_split")
    recipe_class, schema = module["PreferenceFinetuneRecipe"], module["CONFIG_SCHEMA"]
    init_distributed()
    names = []
    for split in splits.split(","):
        mode, mbs, gas = split.split(":")
        name = f"{mode}-w{get_world_size()}-m{mbs}-g{gas}"
        cfg = load_config(config, [f"output_dir={Path(out_root) / name}", f"loss.mode={mode}",
                                   f"micro_batch_size={mbs}", f"gradient_accumulation_steps={gas}"])
        fill_defaults(cfg, schema)
        recipe = recipe_class(cfg)
        with contextlib.redirect_stdout(io.StringIO()):
            recipe.setup()
            recipe.train()
        recipe.logger.close()
        recipe.progress.close()
        names.append(name)
    return names


if __name__ == "__main__":
    done = run_splits(*sys.argv[1:4])
    if get_rank() == 0:
        print(f"SPLITS OK {len(done)} runs on {get_world_size()} rank(s)", flush=True)
    destroy_distributed()
    end_worker()
