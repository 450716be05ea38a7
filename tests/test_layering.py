"""The layout enforces the data flow: lower layers never import higher ones, and nothing cycles.

Every module of ``src/tracin`` belongs to one unit (a top-level module or a subpackage); units are
ordered bottom to top in `LAYERS`. A module may import its own unit and any unit below it, never one
above, and never the ``tracin`` package itself (the user API imports everything, so that would be a
cycle). Imports inside functions count too. Imports under ``if TYPE_CHECKING:`` are for annotations
only (they never run), so they may name a higher layer's types; the code itself depends only
downwards (scorers and analyses take the `tracin.scoring.StoredRun` protocol, not `tracin.Run`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tracin"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_errors", "_version"),
    ("_io", "_progress", "_validate"),
    ("_batch",),
    ("_layout",),
    ("_task",),
    ("_predicted",),
    ("display",),
    ("checkpoints",),
    ("_spec",),
    ("store",),
    ("projection",),
    ("gradients",),
    ("scoring",),
    ("analysis",),
    ("_run", "_run_analysis"),
    ("pipeline",),
    ("report",),
    ("review",),
    ("experiments",),
    ("cli",),
    ("__init__", "__main__"),
)
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """``tracin.store._manifest`` -> ``store``; ``tracin._run`` -> ``_run``; ``tracin`` -> init."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``tracin`` import that runs, at any depth."""
    out: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tracin"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "tracin":
                continue
            if node.module == "tracin":  # from tracin import x: x is a module or a package name
                out += [(node.lineno, f"tracin.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


MODULES = sorted(p for p in SRC.rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in MODULES}
    missing = sorted(units - set(RANK))
    assert not missing, f"give these units a layer in tests/test_layering.py LAYERS: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down(path: Path) -> None:
    me = module_name(path)
    mine = unit_of(me)
    wrong = []
    for line, target in imported(path):
        if target == "tracin" and mine != "__init__":
            wrong.append(f"line {line}: imports the tracin package itself (a cycle)")
            continue
        unit = unit_of(target)
        if unit not in RANK:
            wrong.append(f"line {line}: {target} is not in a layer")
        elif RANK[unit] > RANK[mine]:
            wrong.append(f"line {line}: {me} ({mine}) imports {target} from higher layer {unit}")
    assert not wrong, "\n".join(wrong)


def test_relative_imports_are_not_used() -> None:
    """Relative imports would hide a module's layer from the check above."""
    relative = [
        f"{p.relative_to(SRC)}:{n.lineno}"
        for p in MODULES
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ImportFrom) and n.level > 0
    ]
    assert not relative, relative


def test_no_import_cycle_between_modules() -> None:
    """Module-level imports (the ones that run at import time) form no cycle."""
    graph: dict[str, set[str]] = {}
    names = {module_name(p) for p in MODULES}
    for p in MODULES:
        tree = ast.parse(p.read_text())
        deps: set[str] = set()
        for node in tree.body:  # top level only: what runs when the module is imported
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & names
                deps |= subs  # from pkg import submodule: the submodule
                if node.module in names and len(subs) < len(node.names):
                    deps.add(node.module)
        graph[module_name(p)] = deps - {module_name(p)}
    # a package's __init__ imports its modules; a module importing a sibling through the package
    # would cycle through the __init__, which the graph shows as pkg -> mod -> pkg
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
