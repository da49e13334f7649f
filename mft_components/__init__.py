"""Composable builders that mft's recipes are made of (one concern per module)."""

import logging

# Importing torchao (directly, or through transformers) logs a warning for every CUDA kernel library a CPU build
# cannot load, and torch one for every enum torchao registers with pytree: noise on each mft command that no user
# can act on. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
