"""The `mft` command: run recipes, copy them to customise, list and validate configs, inspect data, export.

    mft ls                                        recipes and their built-in configs
    mft cp NAME DEST [--make-parents] [--force]   copy a built-in recipe or config
    mft run RECIPE --config CONFIG [torchrun flags] [key=value | ~key ...]
    mft validate --config CONFIG [--recipe RECIPE] [--no-data] [key=value ...]
    mft data --config CONFIG [key=value ...] [--show N]
    mft export CHECKPOINT_DIR --output OUT_DIR [--gguf [--gguf-type f16|bf16|q8_0]] [--ollama] [...]
    mft export --adapter ADAPTER_DIR --base MODEL_DIR --output OUT_DIR     merge any PEFT LoRA adapter
    mft import mftcoder CONFIG.json [-o my.yaml]   an mft config from an MFTCoder train config
    mft init --model DIR --data PATH... [-o my_run.yaml]   a config for your model and data, sized for this machine
    mft generate --model DIR (--prompt TEXT | --file PROMPTS.jsonl) [...]
    mft eval --model DIR --suite dataframebench|humaneval|FILE.jsonl [--task T ...] [...]
    mft pairs --model DIR --suite SUITE --num-samples N -o DIR     preference pairs from execution results
    mft plot RUN_DIR [--output DIR]                per-task loss, pass@k, lr, tokens/s curves as PNGs
    mft runs compare A B                          per-task table of two runs' best checkpoints
    mft eval --check-suite humaneval|dataframebench[:TASK]   do the suite's canonical solutions pass here?
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from mft_components.config import registry
from mft_components.config import ConfigError, check_config, load_config

# Commands whose implementation lives with the component they expose (module: add_arguments, run).
COMPONENT_COMMANDS = {
    "data": ("mft_components.data.report", "per-task data statistics and rendered samples with loss marked"),
    "export": ("mft_components.inference.export", "merge LoRA and write a Hugging Face model directory and a PEFT adapter"),
    "generate": ("mft_components.inference.generate", "generate with the training prompt format"),
    "eval": ("mft_components.code_eval.evaluate", "pass@k of generated code per task (dataframebench, humaneval, "
                                                  "your JSONL)"),
    "import": ("mft_components.interop.mftcoder", "an mft config from an MFTCoder train config"),
    "pairs": ("mft_components.code_eval.pairs", "preference pairs (passing vs failing answers) from sampled answers "
                                                "run against their tests"),
    "plot": ("mft_components.training.plots", "a run's curves (per-task loss, pass@k, lr, tokens/s) as PNGs"),
    "runs": ("mft_components.training.runs", "compare runs: per-task table of two runs' best checkpoints"),
    "init": ("mft_components.interop.init_config", "a config for your model and data, sized for this machine"),
}
# Where a command's arguments are defined when that is not its module: one that imports no torch, so that
# `mft export --help` answers in a fraction of a second.
ARGUMENT_MODULES = {
    "export": "mft_components.inference.export_args",
    "generate": "mft_components.inference.generate_args",
    "eval": "mft_components.code_eval.eval_args",
}


# ------------------------------------------------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace) -> int:
    rows = [("RECIPE", "CONFIG")]
    for recipe, configs in registry.RECIPE_CONFIGS.items():
        available = [c for c in configs if registry.builtin_config(c)]
        rows.append((recipe, available[0] if available else ""))
        rows.extend(("", c) for c in available[1:])
    width = max(len(r[0]) for r in rows) + 3
    for recipe, config in rows:
        print(f"{recipe:<{width}}{config}")
    return 0


# ------------------------------------------------------------------------------------------------------- cp


def cmd_cp(args: argparse.Namespace) -> int:
    builtin = registry.builtin_recipe(args.name) or registry.builtin_config(args.name)
    if builtin is None:
        print(f"mft cp: no built-in recipe or config named {args.name!r} (see `mft ls`)", file=sys.stderr)
        return 1
    dest = Path(args.destination)
    if dest.is_dir():
        dest = dest / builtin.path.name
    elif not dest.suffix:
        dest = dest.with_suffix(builtin.path.suffix)  # `mft cp demo my_demo` -> my_demo.yaml
    if dest.exists() and not args.force:
        print(f"mft cp: {dest} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    if not dest.parent.exists():
        if not args.make_parents:
            print(f"mft cp: directory {dest.parent} does not exist; pass --make-parents to create it", file=sys.stderr)
            return 1
        dest.parent.mkdir(parents=True)
    shutil.copyfile(builtin.path, dest)
    print(f"copied {builtin.path.name} to {dest}")
    return 0


# ------------------------------------------------------------------------------------------------------ run


def torchrun_options() -> dict[str, bool]:
    """torchrun's option strings -> whether the option takes a value, read from torchrun's own parser."""
    from torch.distributed.run import get_args_parser

    options = {}
    for action in get_args_parser()._actions:
        takes_value = action.nargs != 0
        for option in action.option_strings:
            options[option] = takes_value
    options.pop("-h", None)
    options.pop("--help", None)
    return options


def split_run_args(argv: list[str]) -> tuple[str, str | None, list[str], list[str]]:
    """``mft run`` arguments -> (recipe, config, torchrun flags, recipe overrides).

    Raises:
        SystemExit: an option that is neither ``--config`` nor a torchrun flag.
    """
    known = torchrun_options()
    recipe = config = None
    launcher, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg == "--config" or name == "--config":
            config = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            i += 1 if eq else 2
            continue
        if arg.startswith("-") and not arg.startswith("~"):
            if name not in known:
                sys.exit(f"mft run: unknown option {name!r}: neither --config nor a torchrun flag (torchrun --help)")
            launcher.append(arg)
            if known[name] and not eq:
                if i + 1 >= len(argv):
                    sys.exit(f"mft run: {name} needs a value")
                launcher.append(argv[i + 1])
                i += 1
        elif recipe is None and "=" not in arg and not arg.startswith("~"):
            recipe = arg
        else:
            overrides.append(arg)
        i += 1
    if recipe is None:
        sys.exit("mft run: which recipe? usage: mft run RECIPE --config CONFIG [torchrun flags] [key=value ...]")
    return recipe, config, launcher, overrides


RUN_USAGE = "mft run RECIPE --config CONFIG [torchrun flags, e.g. --nproc-per-node 2] [key=value | ~key ...]"


def cmd_run(args: argparse.Namespace) -> int:
    if {"-h", "--help"} & set(args.rest):
        return run_help(args.rest)
    recipe_name, config, launcher, overrides = split_run_args(args.rest)
    try:
        recipe = registry.resolve_recipe(recipe_name)
    except FileNotFoundError as e:
        print(f"mft run: {e}", file=sys.stderr)
        return 1
    if config is None:
        print("mft run: --config CONFIG is required (a built-in name from `mft ls` or a YAML file)", file=sys.stderr)
        return 1
    try:
        config_file = str(registry.resolve_config(config))
    except ConfigError as e:
        print(f"mft run: {e}", file=sys.stderr)
        return 1
    recipe_argv = ["--config", config_file, *overrides]
    if launcher:
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(recipe), *recipe_argv]
        return run_torchrun(cmd, _preemption_grace_s(config_file, overrides))
    # One rank, in this process: the recipe sees the same argv and sys.path as under torchrun.
    saved_argv = sys.argv
    sys.argv = [str(recipe), *recipe_argv]
    try:
        with recipe_dir_on_path(recipe):
            runpy.run_path(str(recipe), run_name="__main__")
    except SystemExit as e:
        if e.code in (None, 0):
            return 0
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
            return 1
        return e.code
    except KeyboardInterrupt:  # SIGINT before the recipe handles signals itself (while it imports)
        print("mft run: interrupted (SIGINT) before training started", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        sys.argv = saved_argv
    return 0


def run_help(argv: list[str]) -> int:
    """``mft run RECIPE --help``: the usage, then every config key the recipe reads (its ``CONFIG_SCHEMA``)."""
    from mft_components.config.schema_help import format_config_options

    print(f"usage: {RUN_USAGE}")
    names = [a for a in argv if not a.startswith(("-", "~")) and "=" not in a]
    if not names:
        print("\nmft run RECIPE --help lists the config keys of RECIPE (`mft ls` lists the recipes)")
        return 0
    try:
        recipe = registry.resolve_recipe(names[0])
    except FileNotFoundError as e:
        print(f"mft run: {e}", file=sys.stderr)
        return 1
    schema = recipe_schema(recipe)
    if schema is None:
        print(f"\n{recipe} declares no CONFIG_SCHEMA: its config keys are not known to mft")
        return 0
    print(f"\nConfig keys of {recipe.stem} ({schema.__name__}), set in the YAML file or as key=value after it\n"
          f"(a _component_ node's keys are the arguments of its builder):\n")
    print(format_config_options(schema))
    print("\ntorchrun flags (any of `torchrun --help`) run the recipe under torchrun, e.g. --nproc-per-node 2.")
    return 0


def run_torchrun(cmd: list[str], grace_s: float | None) -> int:
    """Run torchrun in a process group of its own and wait for it. A SIGTERM or SIGINT that mft gets goes to that
    group (torchrun passes it on to its workers, which finish their step, save and stop), and torchrun gets
    SIGTERM should mft itself be killed: no worker keeps training once mft is gone. torchrun waits
    ``preemption_grace_s`` + 10 s for its workers before it kills them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, unless
    set). Returns the recipe's exit status as rank 0 reported it (75 after saving on a signal; torchrun itself
    exits with 1 once it got a signal), else torchrun's."""
    from mft_components.training.preemption import EXIT_STATUS_ENV

    with tempfile.TemporaryDirectory(prefix="mft-run-") as tmp:
        status = Path(tmp) / "exit_status"
        env = {**os.environ, EXIT_STATUS_ENV: str(status)}
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(grace_s) + 10 if grace_s else 24 * 3600))
        launcher = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_end_with_parent)

        def forward(signum, frame) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = launcher.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        reported = status.read_text().strip() if status.is_file() else ""
        return int(reported) if reported.isdigit() else (code if code >= 0 else 128 - code)


def _end_with_parent() -> None:
    """In the child before it runs torchrun: SIGTERM when mft ends (Linux ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _preemption_grace_s(config_file: str, overrides: list[str]) -> float | None:
    """The config's ``preemption_grace_s`` (its default when absent or unreadable: the recipe reports a bad config)."""
    from mft_components.training.preemption import DEFAULT_GRACE_S

    try:
        value = load_config(config_file, overrides).get("preemption_grace_s", DEFAULT_GRACE_S)
    except Exception:  # noqa: BLE001 - any config problem is the recipe's to report, with its message
        return DEFAULT_GRACE_S
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        None if value is None else DEFAULT_GRACE_S)


# ------------------------------------------------------------------------------------------------- validate


@contextlib.contextmanager
def recipe_dir_on_path(recipe: Path):
    """The recipe's directory first on ``sys.path`` while it loads, as ``python recipe.py`` and torchrun have it:
    a copied recipe imports its copied siblings (a copy of full_finetune_distributed.py importing the
    LoRAFinetuneRecipe of a copied lora_finetune_distributed.py)."""
    directory = str(Path(recipe).resolve().parent)
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        sys.path.remove(directory)


def recipe_schema(recipe: Path) -> type | None:
    """The ``CONFIG_SCHEMA`` a recipe file declares (its module is loaded, its main is not run)."""
    with recipe_dir_on_path(recipe):
        return runpy.run_path(str(recipe), run_name="mft_validate").get("CONFIG_SCHEMA")


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    # A copy under another name: the recipe that trains its model.method (or preference pairs).
    method = cfg.get("model", {}).get("method") if isinstance(cfg.get("model"), DictConfig) else None
    data_builder = str(cfg.get("data", {}).get("_component_", "")) if isinstance(cfg.get("data"), DictConfig) else ""
    recipe_name = (args.recipe or registry.recipe_of_config(args.config)
                   or ("preference_finetune_distributed" if data_builder.endswith("build_preference_data") else None)
                   or ("full_finetune_distributed" if method == "full" else "lora_finetune_distributed"))
    try:
        recipe = registry.resolve_recipe(recipe_name)
    except FileNotFoundError as e:
        print(f"mft validate: {e}", file=sys.stderr)
        return 1
    schema = recipe_schema(recipe)
    problems = check_config(cfg, schema)
    # What resume would refuse or change in the checkpoint it picks. Imported here, as the recipe was: torch.
    from mft_components.recipe_config.checks import check_resume

    resume_problems, resume_notes = check_resume(cfg, schema, hash_data=not args.no_data)
    problems += resume_problems
    if resume_notes:
        print("\n".join(resume_notes))
    if problems:
        print(f"{len(problems)} problem(s) in {args.config} (checked against recipe {recipe.stem}):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    if args.no_data:
        print(f"{args.config}: OK for recipe {recipe.stem} (records not read: --no-data)")
        return 0
    if cfg.get("data") is None or cfg.get("tokenizer") is None:  # a custom recipe that reads no data
        print(f"{args.config}: OK for recipe {recipe.stem}")
        return 0
    return _validate_records(cfg, args.config, recipe.stem)


def _validate_records(cfg: DictConfig, source: str, recipe: str) -> int:
    """Reads and tokenises every record as the run will (the run then finds them in the tokenisation cache): a bad
    record stops a run with ``on_bad_record: error`` before the model loads, so validate names it too."""
    # Imported here, not at the top: the data package loads torch, which `mft ls`, `cp` and `--no-data` never need.
    from mft_components.data.records import DataError
    from mft_components.data.report import build_config_data

    try:
        _, data = build_config_data(cfg, source)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"data error in {source}:\n{e}", file=sys.stderr)
        return 1
    for note in data.notes:
        print(note)
    records = sum(counts["records"] for counts in data.counts.values())
    skipped = f"; {len(data.skipped)} bad record(s) the run will skip (data.on_bad_record: skip), first: " \
              f"{data.skipped[0]}" if data.skipped else ""
    print(f"{source}: OK for recipe {recipe} ({records} records read{skipped})")
    return 0


# --------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mft",
        description="Multi-task fine-tuning of code LLMs: PyTorch-native recipes, MFTCoder's multi-task loss.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", help="list recipes and their built-in configs")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("cp", help="copy a built-in recipe or config to customise it")
    p.add_argument("name", help="recipe or config name (see `mft ls`)")
    p.add_argument("destination", help="file or directory to copy to")
    p.add_argument("--make-parents", action="store_true", help="create missing parent directories")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser(
        "run",
        help="run a recipe: in this process, or under torchrun when any torchrun flag is given",
        usage=RUN_USAGE, description="`mft run RECIPE --help` lists the recipe's config keys.",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a config without training; report every problem")
    p.add_argument("--config", required=True, help="built-in config name or YAML file")
    p.add_argument("--recipe", help="recipe whose keys to check against (default: the config's built-in recipe)")
    p.add_argument("--no-data", action="store_true",
                   help="check the config only; do not read and tokenise the records (as `mft data` and the run do)")
    p.add_argument("overrides", nargs="*", help="key=value or ~key")
    p.set_defaults(func=cmd_validate)

    for name, (module, help_text) in COMPONENT_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=_component_command(module), component_module=module)
    return parser


def _component_command(module_name: str):
    def run(args: argparse.Namespace) -> int:
        status = importlib.import_module(module_name).run(args)
        if status == 0 and args.command == "init":  # the config just written is checked as `mft validate` would
            print(f"\nmft validate --config {args.output}:")
            status = cmd_validate(argparse.Namespace(config=args.output, recipe=None, no_data=False, overrides=[]))
        return status

    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `mft run` passes torchrun flags through, before or after RECIPE: argparse would reject them.
    if len(argv) > 1 and argv[0] == "run" and not {"-h", "--help"} & set(argv[1:2]):
        return cmd_run(argparse.Namespace(rest=argv[1:]))
    # Component commands declare their own arguments; import a module only when its command is used.
    if argv and argv[0] in COMPONENT_COMMANDS:
        module = importlib.import_module(ARGUMENT_MODULES.get(argv[0], COMPONENT_COMMANDS[argv[0]][0]))
        module.add_arguments(parser._subparsers._group_actions[0].choices[argv[0]])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
