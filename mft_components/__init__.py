"""Composable builders that mft's recipes are made of, in layers.

Bottom to top; a module imports only from its own layer (without cycles) or lower ones, never from a higher one
(tests/test_layout.py walks every import and checks it)::

    device.py, distributed.py   the accelerator; the process group, heartbeat, reductions
    assets/                     what mft fetches from PyPI packages (the demo's model and data), cached
    config/                     YAML, overrides, `_component_` instantiation, built-in configs, validation
    data/                       records -> chat format -> tokens (cached) -> samples -> packed rows -> loaders
    loss/                       chunked cross entropy, MFTCoder's task-weighted modes, CoBa
    models/                     LoRA / NF4, packed attention, MFTModel (it computes the loss in its forward),
                                building and weight streaming, FSDP2 / checkpointing / compile, liger, MoE
    training/                   checkpoints, resume state, the loop's position, schedule, evaluation, guards
    inference/                  adapters, streamed safetensors, `mft export`, batched decoding, `mft generate`
    code_eval/                  pass@k of generated code in a sandbox, in training and `mft eval`
    recipe_config/              the recipes' config schema and its checks against every component
    interop/                    importing MFTCoder configs (`mft import`)

Above them: the recipes (package ``mft_recipes``) and ``cli.py``. ``legacy/`` holds one deprecated shim per
module name of the flat layout before (``mft_components.metrics``, ``.checkpoint``, ...), for recipes copied with
``mft cp`` before it.
"""

import logging
import os
import re
import sys
import warnings

# Importing torchao (directly, or through transformers) logs "Failed to load .../torchao/_C_mxfp8...so" for every
# kernel library its wheel cannot load here, and torch a warning for every enum torchao registers with pytree:
# noise on each mft command that no user can act on. Only those lines are dropped; torchao's other warnings show.
_LIBRARY_NOISE = {
    "torchao": re.compile(r"^Failed to load \S*torchao\S*_C\w*\S*\.so\b"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
}
for _name, _noise in _LIBRARY_NOISE.items():
    logging.getLogger(_name).addFilter(lambda record, noise=_noise: not noise.search(record.getMessage()))

# The old flat module names resolve to the shims in legacy/ (a plain directory, searched after this package's
# own modules and subpackages, which so always win).
__path__.append(os.path.join(os.path.dirname(__file__), "legacy"))

# Each shim says where its module went with a DeprecationWarning, which Python shows only for code in __main__;
# an old `_component_` path in a config is imported by mft_components.config. Show mft's own, once per place,
# unless the command line (-W) or PYTHONWARNINGS says otherwise.
if not sys.warnoptions:
    warnings.filterwarnings("default", category=DeprecationWarning, message=r"mft_components\.")
