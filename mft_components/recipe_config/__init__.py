"""The recipes' config: the keys they read and the checks of their values against every component.

    schema.py   RecipeConfig, LoRARecipeConfig, FullRecipeConfig: typed keys, bounds, the `_component_` sections
    checks.py   what a schema cannot say: values checked against the model directory, the tokenizer, the data,
                the loss and eval.code (``mft validate`` and the recipes' ``@parse`` run them alike)

It knows every component, so it sits above them all (models, data, loss, code_eval).
"""
