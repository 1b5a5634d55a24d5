"""The package's layering: every module imports only from layers below it, and imports in any order.

The layers are written down once, in ``mlocompile.LAYERS`` (and toured in its docstring).
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import mlocompile

ROOT = Path(__file__).resolve().parents[1]


def _full(name: str) -> str:
    return name if name == "mlocompile" or name.split(".")[0] == "passes" else f"mlocompile.{name}"


LAYER = {_full(m): i for i, (_, mods) in enumerate(mlocompile.LAYERS) for m in mods}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.glob("mlocompile/*.py"), *ROOT.glob("passes/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or ast.unparse(test) == "typing.TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """Every mlocompile/passes module ``path`` imports, at any depth (annotation-only imports aside)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from mlocompile import cost`` imports the module mlocompile.cost
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in LAYER else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m.split(".")[0] in ("mlocompile", "passes")}


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER), "add new modules to mlocompile.LAYERS (and remove deleted ones)"


def test_modules_import_only_from_lower_layers():
    wrong = []
    for name, path in _modules().items():
        for dep in sorted(_imports(path) - {name}):
            if LAYER[dep] >= LAYER[name]:
                layer, dep_layer = mlocompile.LAYERS[LAYER[name]][0], mlocompile.LAYERS[LAYER[dep]][0]
                wrong.append(f"{name} ({layer}) imports {dep} ({dep_layer})")
    assert not wrong, "imports that break the layering:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: _imports(path) - {name} for name, path in _modules().items()}
    order = sorted(graph, key=lambda m: LAYER[m])  # a topological order exists iff every edge points down
    seen: set[str] = set()
    for name in order:
        assert graph[name] <= seen, f"{name} imports {sorted(graph[name] - seen)} from its own layer or above"
        seen.add(name)


def test_forbidden_imports_are_caught():
    code = "from mlocompile.engine import Engine\n\ndef f():\n    import passes\n"
    tree_path = ROOT / "tests" / "_layering_probe.py"
    try:
        tree_path.write_text(code)
        assert _imports(tree_path) == {"mlocompile.engine", "passes"}
    finally:
        tree_path.unlink()


def test_every_module_imports_first_and_in_any_order():
    """A fresh interpreter per module (forked once third-party libraries are loaded): it first, then the rest shuffled."""
    modules = sorted(_modules())
    rng = random.Random(0)
    orders = [[first, *rng.sample([m for m in modules if m != first], len(modules) - 1)] for first in modules]
    orders += [rng.sample(modules, len(modules)) for _ in range(3)]
    script = textwrap.dedent(
        """
        import importlib, os, sys
        # NOTE: not ours, and slow to load: loaded once, before the forks
        import networkx, sympy, torch, torch.distributed, torch.func, torch.fx, torch.nn.attention, torch.utils.data
        import torch.distributed._functional_collectives, torch.fx.experimental.proxy_tensor, torch.utils.flop_counter
        orders = [line.split() for line in sys.stdin.read().splitlines()]
        failed = 0
        for order in orders:
            pid = os.fork()
            if pid == 0:
                try:
                    for name in order:
                        importlib.import_module(name)
                except BaseException as exc:
                    print(f"{order[0]} first, at {name}: {type(exc).__name__}: {exc}", flush=True)
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            failed += status != 0
        sys.exit(1 if failed else 0)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input="\n".join(" ".join(o) for o in orders),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
