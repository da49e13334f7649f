"""Config loading, overrides, interpolation, `_component_` instantiation and validation."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, TypedDict

import pytest
import torch
from omegaconf import OmegaConf

from mft_components.config import (
    ConfigError,
    apply_overrides,
    check_config,
    fill_defaults,
    instantiate,
    load_config,
    parse,
    parse_override,
)


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def make_counter(start: int = 0, step: int = 1, inner=None):
    return {"start": start, "step": step, "inner": inner}


def make_pair(first, second, scale: float = 1.0):
    return (first, second, scale)


class Options(TypedDict, total=False):
    rank: int
    targets: list | str | None


def make_with_options(name: str, options: Options | None = None):
    return name, options


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a.b=3", ("a.b", 3, False)),
        ("a=1e-4", ("a", 1e-4, False)),
        ("a=true", ("a", True, False)),
        ("a=null", ("a", None, False)),
        ("a=[1, 2]", ("a", [1, 2], False)),
        ("a=x=y", ("a", "x=y", False)),
        ("a=", ("a", "", False)),
        ("a=hello world", ("a", "hello world", False)),
        ("~a.b", ("a.b", None, True)),
    ],
)
def test_parse_override_values_are_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("bad", ["novalue", "=3", "~", "~a=3"])
def test_parse_override_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_overrides_set_add_and_delete(tmp_path):
    path = write(tmp_path, "a:\n  b: 1\n  c: 2\nd: x\n")
    cfg = load_config(path, ["a.b=5", "a.new=[1, 2]", "~a.c", "e.f.g=true"])
    assert OmegaConf.to_container(cfg) == {"a": {"b": 5, "new": [1, 2]}, "d": "x", "e": {"f": {"g": True}}}


def test_deleting_a_missing_key_is_an_error(tmp_path):
    cfg = load_config(write(tmp_path, "a: 1\n"))
    with pytest.raises(ConfigError, match="no key 'b.c'"):
        apply_overrides(cfg, ["~b.c"])


def test_interpolation_follows_overrides(tmp_path):
    path = write(tmp_path, "model:\n  dir: /m\ntokenizer:\n  path: ${model.dir}\n")
    cfg = load_config(path, ["model.dir=/other"])
    assert cfg.tokenizer.path == "/other"


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(write(tmp_path, "- 1\n- 2\n", "bad.yaml"))


def test_instantiate_with_runtime_args_and_nested_components():
    cfg = OmegaConf.create(
        {
            "_component_": f"{__name__}.make_pair",
            "second": {"_component_": f"{__name__}.make_counter", "start": 3},
            "scale": 2.0,
        }
    )
    first, second, scale = instantiate(cfg, "runtime-first")
    assert first == "runtime-first"
    assert second == {"start": 3, "step": 1, "inner": None}
    assert scale == 2.0


def test_instantiate_runtime_kwargs_win_and_optimizer_gets_params():
    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = OmegaConf.create({"_component_": "torch.optim.AdamW", "lr": 0.1, "weight_decay": 0.5})
    opt = instantiate(cfg, params, lr=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["weight_decay"] == 0.5


def test_instantiate_errors():
    with pytest.raises(ConfigError, match="no '_component_'"):
        instantiate(OmegaConf.create({"lr": 1}))
    with pytest.raises(ConfigError, match="cannot import"):
        instantiate(OmegaConf.create({"_component_": "torch.optim.NoSuchThing"}))
    with pytest.raises(ConfigError, match="make_counter"):
        instantiate(OmegaConf.create({"_component_": f"{__name__}.make_counter", "strat": 1}))


@dataclasses.dataclass
class TrainingSchema:
    epochs: int = 1
    lr_warmup: float = 0.0
    packing: Literal["pack", "padding"] = "pack"
    max_steps: Optional[int] = None


@dataclasses.dataclass
class RecipeSchema:
    output_dir: str
    training: TrainingSchema = dataclasses.field(default_factory=TrainingSchema)
    optimizer: dict = dataclasses.field(default_factory=dict)
    counter: Any = dataclasses.field(default=None, metadata={"runtime_args": ("inner",)})
    pair: Any = dataclasses.field(default=None, metadata={"runtime_args": ("first",)})


def test_check_config_reports_every_problem_with_file_and_closest_key(tmp_path):
    path = write(
        tmp_path,
        f"""
trainin:
  epochs: 1
training:
  epocs: 2
  packing: packed
  max_steps: many
optimizer:
  _component_: torch.optim.AdamW
  lr: 0.1
  weight_decy: 0.1
counter:
  _component_: {__name__}.make_counter
  stat: 1
pair:
  _component_: {__name__}.make_pair
  second:
    _component_: {__name__}.make_counter
    setp: 2
model:
  _component_: no.such.module
""",
    )
    problems = check_config(load_config(path), RecipeSchema)
    text = "\n".join(problems)
    assert all(p.startswith(str(path)) for p in problems)
    assert "unknown key 'trainin' (did you mean 'training'?)" in text
    assert "unknown key 'training.epocs' (did you mean 'training.epochs'?)" in text
    assert "'training.packing' is 'packed': expected one of 'pack', 'padding'" in text
    assert "'training.max_steps' is 'many'" in text
    assert "'optimizer.weight_decy' is not an argument of torch.optim.AdamW (did you mean 'optimizer.weight_decay'?)" in text
    assert "'counter.stat' is not an argument" in text and "did you mean 'counter.start'?" in text
    assert "'pair.second.setp'" in text and "did you mean 'pair.second.step'?" in text
    assert "missing required key 'output_dir'" in text
    assert "unknown key 'model'" in text
    assert len(problems) == 9


def test_check_config_accepts_a_good_config_and_runtime_args(tmp_path):
    path = write(
        tmp_path,
        f"""
output_dir: out
training: {{epochs: 3, lr_warmup: 1, max_steps: null}}
optimizer: {{_component_: torch.optim.AdamW, lr: 0.1}}
pair: {{_component_: {__name__}.make_pair, second: 2}}
""",
    )
    assert check_config(load_config(path), RecipeSchema) == []


def _lr_not_above_one(data: dict, flagged: set) -> list[str]:
    lr = data.get("optimizer", {}).get("lr", 0)
    return [f"'optimizer.lr' is {lr!r}: expected at most 1"] if lr > 1 else []


@dataclasses.dataclass
class CheckedSchema(RecipeSchema):
    semantic_checks = (_lr_not_above_one,)


def test_problems_from_overrides_name_the_override_nested_components_and_semantic_checks_too(tmp_path):
    path = write(tmp_path, f"output_dir: out\npair: {{_component_: {__name__}.make_pair, second: 2}}\n")
    overrides = ["optimizer={_component_: torch.optim.AdamW, lr: 0.1}", "optimizer.lr=5", "pair.scale=big",
                 "training.epochs=two", "pair.second={_component_: " + __name__ + ".make_counter, setp: 1}"]
    problems = check_config(load_config(path, overrides), CheckedSchema)
    assert sorted(problems) == sorted([
        "optimizer.lr=5 (command line): 'optimizer.lr' is 5: expected at most 1",
        "pair.scale=big (command line): 'pair.scale' is 'big': expected a number",
        "training.epochs=two (command line): 'training.epochs' is 'two': expected an integer",
        f"{overrides[-1]} (command line): 'pair.second.setp' is not an argument of {__name__}.make_counter "
        "(did you mean 'pair.second.step'?)",
    ])


def test_check_config_without_schema_checks_components_and_paths(tmp_path):
    path = write(
        tmp_path,
        "data:\n  _component_: " + __name__ + ".make_counter\n  data_paths: [/no/such/dir]\n",
    )
    problems = check_config(load_config(path))
    assert len(problems) == 2
    assert "'data.data_paths' is not an argument" in problems[0]
    assert "path does not exist: /no/such/dir" in problems[1]


def test_parse_decorator_reads_argv_and_exits_on_errors(tmp_path):
    path = write(tmp_path, "output_dir: o\ntraining: {epochs: 1}\n")
    seen = {}

    @parse(schema=RecipeSchema)
    def recipe_main(cfg):
        seen["epochs"] = cfg.training.epochs

    recipe_main(["--config", str(path), "training.epochs=4"])
    assert seen["epochs"] == 4
    with pytest.raises(SystemExit, match="did you mean 'training.epochs'"):
        recipe_main(["--config", str(path), "training.epoch=4"])
    with pytest.raises(SystemExit, match="--config is required"):
        recipe_main(["training.epochs=4"])


def test_parse_fills_schema_defaults(tmp_path):
    path = write(tmp_path, "output_dir: o\ntraining: {epochs: 2}\n")
    seen = {}

    @parse(schema=RecipeSchema)
    def recipe_main(cfg):
        seen.update(OmegaConf.to_container(cfg))

    recipe_main(["--config", str(path)])
    assert seen["training"] == {"epochs": 2, "lr_warmup": 0.0, "packing": "pack", "max_steps": None}
    assert seen["counter"] is None and seen["optimizer"] == {}


def test_check_config_checks_typed_dict_arguments(tmp_path):
    path = write(
        tmp_path,
        f"""
thing:
  _component_: {__name__}.make_with_options
  name: x
  options: {{rnak: 3, targets: 5}}
""",
    )
    problems = check_config(load_config(path))
    assert len(problems) == 2
    assert "unknown key 'thing.options.rnak' (did you mean 'thing.options.rank'?)" in problems[0]
    assert "'thing.options.targets' is 5: expected a list or a string or null" in problems[1]
    ok = write(tmp_path, f"thing: {{_component_: {__name__}.make_with_options, name: x, options: {{rank: 3}}}}\n", "ok.yaml")
    assert check_config(load_config(ok)) == []


@dataclasses.dataclass
class SectionSchema:
    counter: dict = dataclasses.field(default_factory=lambda: {"_component_": f"{__name__}.make_counter"},
                                      metadata={"runtime_args": ()})
    pair: Any = dataclasses.field(default=None, metadata={"runtime_args": ("first",)})


def test_a_section_given_in_part_keeps_its_default_builder(tmp_path):
    """`counter.step=2` on a config without a counter section is checked and built with the default builder; a
    section without a default builder must name one (it used to pass validation and fail at instantiation)."""
    cfg = load_config(write(tmp_path, "counter: {step: 2}\n"))
    assert check_config(cfg, SectionSchema) == []
    fill_defaults(cfg, SectionSchema)
    assert instantiate(cfg.counter) == make_counter(step=2)
    problems = check_config(load_config(write(tmp_path, "counter: {setp: 2}\npair: {second: 1}\n")), SectionSchema)
    assert len(problems) == 2
    assert "'counter.setp' is not an argument of tests.test_config.make_counter" in problems[0]
    assert "'pair' has no '_component_'" in problems[1]
