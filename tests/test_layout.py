"""The package's layers (mft_components/__init__.py, README "Layout"): imports only go down, never round in a circle;
every module imports on its own; no module is over 600 lines.

Every import of an mft module counts: at the top of a module, inside a function, under ``TYPE_CHECKING``, and
``importlib.import_module`` of a literal name. ``from mft_components import x`` imports module ``x``; a package's
``__init__.py`` (its face) imports what it re-exports. The shims in ``legacy/`` are the top layer.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "mft_components"
# The documented order, bottom to top: a module may import from its own layer (without a cycle) or lower ones.
LAYERS = ("device", "distributed", "assets", "config", "data", "loss", "models", "training", "inference", "code_eval",
          "recipe_config", "interop", "legacy")
MAX_LINES = 600
# Outside the package: these use the new module names only (a legacy name there would be a missed update).
USERS = ("cli.py", "recipes/*.py", "bench/*.py", "tests/dist/*.py")


def module_files() -> dict[str, Path]:
    """Every module of the package by the name it is imported as (legacy/x.py is ``mft_components.x``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "legacy":
            parts = parts[1:]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(("mft_components", *parts))] = path
    return modules


def layer(path: Path) -> int:
    """The layer of a module file (the package's own __init__.py, which imports nothing of mft, is below all)."""
    parts = path.relative_to(PACKAGE).parts
    if len(parts) == 1 and parts[0] == "__init__.py":
        return -1
    return LAYERS.index(parts[0].removesuffix(".py"))


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported mft module, line) for every import in ``path``, wherever it stands."""
    package = path.relative_to(REPO_ROOT).with_suffix("").parts[:-1]
    found = []

    def add(name: str, line: int) -> None:
        if name == "mft_components" or name.startswith("mft_components."):
            found.append((name, line))

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package upwards
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node.lineno)
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = module_files()
    edges = {}  # module -> [(imported module, line of its first import)]
    for name, path in modules.items():
        first: dict[str, int] = {}
        for target, line in imports(path, modules):
            first.setdefault(target, line)
        edges[name] = list(first.items())
    for name, targets in edges.items():
        unknown = [t for t, _ in targets if t not in modules]
        assert not unknown, f"{modules[name]} imports {unknown}, which are not modules of mft_components"
    return modules, edges


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def test_imports_go_down_the_layers_and_never_round_in_a_circle():
    modules, edges = import_graph()
    upward = [f"{rel(modules[name])}:{line}: imports {target} ({LAYERS[layer(modules[target])]}), a higher layer than "
              f"{LAYERS[layer(modules[name])] if layer(modules[name]) >= 0 else 'the package root'}"
              for name, targets in edges.items() for target, line in targets
              if layer(modules[target]) > layer(modules[name])]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)

    # Circles: a depth-first search that reports the first loop it closes, file by file with the import's line.
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[tuple[str, int]] = []
    circles = []

    def visit(name: str) -> None:
        state[name] = 1
        for target, line in edges[name]:
            path.append((name, line))
            if state.get(target) == 1:
                start = next(i for i, (n, _) in enumerate(path) if n == target)
                circles.append(" -> ".join(f"{rel(modules[n])}:{ln}" for n, ln in path[start:]) + f" -> {target}")
            elif target not in state:
                visit(target)
            path.pop()
        state[name] = 2

    for name in modules:
        if name not in state:
            visit(name)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_package_faces_import_their_own_modules_in_dependency_order():
    """A package's __init__.py re-exports: it defines nothing, imports only its own modules (and lower layers), and
    imports each module after the ones it depends on."""
    modules, edges = import_graph()
    for name, path in modules.items():
        if path.name != "__init__.py" or path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defined, f"{rel(path)} defines {defined}; a package face only re-exports"
        own = [t for t, _ in edges[name] if t.startswith(name + ".")]
        for i, module in enumerate(own):
            later = [t for t, _ in edges[module] if t in own[i + 1:]]
            assert not later, f"{rel(path)} imports {module} before {later}, which it imports"


def test_code_outside_the_package_uses_the_new_module_names():
    modules = module_files()
    legacy = {name for name, path in modules.items() if path.parent.name == "legacy"}
    stale = [f"{rel(path)}:{line}: {target}"
             for pattern in USERS for path in sorted(REPO_ROOT.glob(pattern))
             for target, line in imports(path, modules) if target in legacy]
    assert not stale, "old module names (legacy shims) imported:\n" + "\n".join(stale)


def test_every_module_imports_alone():
    """One interpreter imports the heavy third-party libraries once, then forks a child per mft module that
    imports just that module: whatever it needs it must import itself, in an order that works."""
    names = sorted(module_files())
    script = textwrap.dedent("""
        import importlib, json, os, sys, traceback
        for heavy in ("numpy", "torch", "torch.distributed.fsdp", "torch.distributed.tensor", "torchao.quantization",
                      "torchdata.stateful_dataloader", "safetensors.torch", "transformers", "omegaconf", "yaml",
                      "tqdm"):
            importlib.import_module(heavy)
        from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        assert not [m for m in sys.modules if m.startswith("mft_components")]
        failures = {}
        for name in json.loads(sys.argv[1]):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                try:
                    importlib.import_module(name)
                    message = ""
                except BaseException:
                    message = traceback.format_exc()[-3000:]
                os.write(write, message.encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                message = pipe.read().decode()
            _, status = os.waitpid(pid, 0)
            if message or status:
                failures[name] = message or f"exit status {status}"
        print(json.dumps(failures))
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", script, json.dumps(names)],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {name} alone fails:\n{error}" for name, error in failures.items())


def test_no_module_is_over_600_lines():
    lines = {rel(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them where the concerns part): {long}"
