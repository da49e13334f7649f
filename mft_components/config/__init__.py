"""Declarative YAML configs: loading, command-line overrides, `_component_` instantiation, validation.

    core.py      ConfigError, the YAML loader, overrides, to_container, import_object, instantiate
    registry.py  the built-in recipes and configs, found by name (a name that is not built in is a file path)
    validate.py  check_config: keys, types and bounds against a recipe's schema, components against signatures
    load.py      load_config, and the recipes' @parse entry (load, validate, fill the schema's defaults)

The names of the flat ``config.py`` this package replaced are all here.
"""

from mft_components.config.core import (
    COMPONENT_KEY,
    ConfigError,
    YamlLoader,
    apply_overrides,
    import_object,
    instantiate,
    parse_override,
    read_yaml,
    set_source,
    source_of,
    to_container,
)
from mft_components.config.registry import resolve_config, resolve_recipe
from mft_components.config.validate import PATH_ARGUMENTS, check_config
from mft_components.config.load import fill_defaults, load_config, parse, split_config_args

__all__ = ["COMPONENT_KEY", "ConfigError", "YamlLoader", "apply_overrides", "import_object", "instantiate",
           "parse_override", "read_yaml", "set_source", "source_of", "to_container", "resolve_config",
           "resolve_recipe", "PATH_ARGUMENTS", "check_config", "fill_defaults", "load_config", "parse",
           "split_config_args"]
