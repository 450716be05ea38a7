"""Everything the README, docs, examples and benchmarks use is public: no ``tracin._`` there.

A user copies from these files; a private module they name (``tracin._x`` or
``tracin.pkg._x``) may move without notice. Every name they need is in the ``__all__`` of `tracin`
or of one of its subpackages, which is also what the API reference lists.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import tracin

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"\btracin(?:\.[a-z]\w*)*\._\w+|from tracin(?:\.[a-z]\w*)* import _\w+")
FILES = sorted(
    [ROOT / "README.md"]
    + [
        p
        for d in ("docs", "examples", "benchmarks")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".md")
    ]
)
PUBLIC_IMPORT = re.compile(r"^\s*from (tracin(?:\.[a-z]\w*)*) import \(?([^)\n]+)", re.M)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_module_is_named(path: Path) -> None:
    text = path.read_text()
    hits = [
        f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for m in PRIVATE.finditer(text)
        if m.group(0) != "tracin.__version__"
    ]
    assert not hits, (
        f"{path.relative_to(ROOT)} names private modules (use a public name):\n" + "\n".join(hits)
    )


@pytest.mark.parametrize(
    "path", [p for p in FILES if p.suffix == ".py"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_imported_names_are_in_all(path: Path) -> None:
    missing = []
    for m in PUBLIC_IMPORT.finditer(path.read_text()):
        module = importlib.import_module(m.group(1))
        for name in (n.strip().split(" as ")[0] for n in m.group(2).split(",")):
            if name and name not in getattr(module, "__all__", ()) and name != "__version__":
                missing.append(f"{m.group(1)}.{name}")
    assert not missing, f"not in the module's __all__: {missing}"


def test_subpackages_all_resolve() -> None:
    """Every name in each public ``__all__`` is really there (the API reference documents them)."""
    import pkgutil

    for info in pkgutil.iter_modules(tracin.__path__):
        if info.name.startswith("_") or not info.ispkg:
            continue
        module = importlib.import_module(f"tracin.{info.name}")
        assert getattr(module, "__all__", None), f"tracin.{info.name} has no __all__"
        for name in module.__all__:
            assert getattr(module, name, None) is not None, f"tracin.{info.name}.{name}"
