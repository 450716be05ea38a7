"""The API reference documents exactly the public names, whose docstrings state what they raise.

The site is MkDocs + mkdocstrings (``mkdocs.yml``); each public package ``P`` (``tracin`` and
every subpackage without an underscore) has a page ``docs/api/P.md`` holding ``::: P``. The test
builds the site with ``--strict`` and reads the objects inventory it writes (``objects.inv``, the
Sphinx format): the names rendered on the page are its primary entries (priority 1), which must
be ``P.__all__``.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import pkgutil
import re
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest

import tracin

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "docs" / "api"
# name, domain:role, priority, uri, display name (Sphinx inventory v2)
_INV_LINE = re.compile(r"(.+?)\s+(\S+:\S+)\s+(-?\d+)\s+(\S+)\s+(.*)")
_DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)
_CONSTRUCTORS = ("__init__", "__post_init__")


def public_packages() -> list[str]:
    """``tracin`` and each of its subpackages with no underscore-prefixed component, sorted."""
    found = ["tracin"]
    for info in pkgutil.walk_packages(tracin.__path__, "tracin."):
        if info.ispkg and not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return sorted(found)


def page_for(package: str) -> Path:
    return API_DIR / f"{package}.md"


def read_inventory(path: Path) -> dict[str, int]:
    """``{name: priority}`` of the Python objects in a Sphinx v2 ``objects.inv``."""
    version, _project, _version, _compression, body = path.read_bytes().split(b"\n", 4)
    assert version == b"# Sphinx inventory version 2", version
    entries: dict[str, int] = {}
    for line in zlib.decompress(body).decode().splitlines():
        match = _INV_LINE.fullmatch(line)
        if match and match.group(2).startswith("py:"):
            name, priority = match.group(1), int(match.group(3))
            entries[name] = min(priority, entries.get(name, priority))
    return entries


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Build the site as CI does (strict: any warning fails) and read its inventory."""
    pytest.importorskip("mkdocstrings_handlers.python", reason="needs the docs extra")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site = tmp_path_factory.mktemp("site")
    config = load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(site))
    build(config)  # raises mkdocs.exceptions.Abort on any warning under strict
    return read_inventory(site / "objects.inv")


def test_inventory_reader_reads_the_format(tmp_path: Path) -> None:
    body = "tracin.open py:function 1 api/tracin/#$ -\ntracin.pipeline.open py:function 2 x/#$ -\n"
    path = tmp_path / "objects.inv"
    header = b"# Sphinx inventory version 2\n# Project: t\n# Version: 0\n# zlib\n"
    path.write_bytes(header + zlib.compress(body.encode()))
    assert read_inventory(path) == {"tracin.open": 1, "tracin.pipeline.open": 2}


def test_every_public_package_has_an_api_page() -> None:
    packages = public_packages()
    assert "tracin.review" in packages  # the discovery finds subpackages at all
    for package in packages:
        page = page_for(package)
        assert page.exists(), (
            f"public package {package} has no API page: add {page.relative_to(ROOT)} with the "
            f"3 lines '# {package}', '', '::: {package}' (see the comment in mkdocs.yml)"
        )
        assert _DIRECTIVE.findall(page.read_text()) == [package], (
            f"{page.relative_to(ROOT)} must hold exactly one directive, '::: {package}'"
        )
    stale = {p.stem for p in API_DIR.glob("*.md")} - set(packages)
    assert not stale, f"docs/api/ has pages for packages that are not public: {sorted(stale)}"


@pytest.mark.parametrize("package", public_packages())
def test_api_page_documents_exactly_all(package: str, inventory: dict[str, int]) -> None:
    exported = set(importlib.import_module(package).__all__)
    prefix = f"{package}."
    rendered = {
        name.removeprefix(prefix)
        for name, priority in inventory.items()
        if priority == 1 and name.startswith(prefix) and "." not in name.removeprefix(prefix)
    }
    missing, extra = sorted(exported - rendered), sorted(rendered - exported)
    assert not missing and not extra, (
        f"{page_for(package).relative_to(ROOT)}: in {package}.__all__ but not documented: "
        f"{missing}; documented but not in __all__: {extra}"
    )


# --- docstrings -------------------------------------------------------------------------------


@functools.cache
def _griffe_package() -> Any:
    griffe = pytest.importorskip("griffe", reason="needs the docs extra")
    loader = griffe.GriffeLoader(
        docstring_parser=griffe.Parser.google, search_paths=[str(ROOT / "src")]
    )
    root = loader.load("tracin")
    loader.resolve_aliases(implicit=False, external=False)
    return root


def _defined_in_package(name: str) -> Any:
    """The class named ``name`` defined in any module of the package (found statically)."""
    stack = [_griffe_package()]
    while stack:
        module = stack.pop()
        member = module.members.get(name)
        if member is not None and not member.is_alias and member.is_class:
            return getattr(importlib.import_module(module.path), name, None)
        stack.extend(m for m in module.members.values() if not m.is_alias and m.is_module)
    return None


def _exception(name: str, module: str) -> type[BaseException] | None:
    """The exception class that ``name`` means in ``module``, builtins or the package."""
    namespace = vars(sys.modules[module]) if module in sys.modules else {}
    found = namespace.get(name, getattr(builtins, name, None))
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    found = _defined_in_package(name)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _raised_names(source: str) -> set[str]:
    """Class names in the function's own ``raise X(...)`` statements (not nested functions)."""
    if not source.strip():  # a dataclass's generated __init__ has no source
        return set()
    tree = ast.parse(textwrap.dedent(source)).body[0]
    names: set[str] = set()
    stack: list[ast.AST] = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name | ast.Attribute):
                names.add(exc.id if isinstance(exc, ast.Name) else exc.attr)
        stack.extend(ast.iter_child_nodes(node))
    return names


def _documented(doc: Any) -> list[str]:
    """The exception names listed in a docstring's ``Raises:`` sections."""
    if doc is None:
        return []
    return [
        str(item.annotation).rsplit(".", 1)[-1]
        for section in doc.parsed
        if section.kind.value == "raises"
        for item in section.value
    ]


def _undocumented_raises(function: Any, docs: list[Any]) -> list[str]:
    """Problems: raised classes no ``Raises:`` entry covers, entries that are not exceptions."""
    module = function.module.path
    listed = [name for doc in docs for name in _documented(doc)]
    problems = [f"Raises: lists {n!r}, no exception" for n in listed if not _exception(n, module)]
    covers = [c for c in (_exception(n, module) for n in listed) if c is not None]
    for name in sorted(_raised_names(function.source)):
        raised = _exception(name, module)
        if raised is not None and not any(issubclass(raised, c) for c in covers):
            problems.append(f"raises {name} but its docstring's Raises: does not say so")
    return problems


def _public_callables(package: str, root: Any) -> list[tuple[str, Any, Any]]:
    """``(qualified name, griffe object, owner)`` for the functions and classes in ``__all__``
    and each class's public methods and constructors, its own or inherited from a class of the
    package (what its reference page shows); ``owner`` is the public class it is shown on."""
    module = root if package == "tracin" else root[package.removeprefix("tracin.")]
    found: list[tuple[str, Any, Any]] = []
    for name in importlib.import_module(package).__all__:
        obj = module[name].final_target if module[name].is_alias else module[name]
        if obj.is_function or obj.is_class:
            found.append((f"{package}.{name}", obj, None))
        if not obj.is_class:
            continue
        for member_name, member in obj.all_members.items():
            public = not member_name.startswith("_") or member_name in _CONSTRUCTORS
            target = member.final_target if member.is_alias else member
            if public and target.is_function and target.path.startswith("tracin."):
                found.append((f"{package}.{name}.{member_name}", target, obj))
    return found


@pytest.mark.parametrize("package", public_packages())
def test_public_docstrings_state_what_they_raise(package: str) -> None:
    """Every public function, class and method has a docstring, and every exception it raises
    itself (``raise X(...)`` in its own body) is covered by an entry of its ``Raises:`` section;
    a constructor's (``__init__``/``__post_init__``) in the class docstring or its own."""
    problems: list[str] = []
    for qualname, obj, owner in _public_callables(package, _griffe_package()):
        constructor = owner is not None and obj.name in _CONSTRUCTORS
        if obj.docstring is None and not constructor:
            problems.append(f"{qualname}: no docstring")
        if obj.is_function:
            docs = [obj.docstring, owner.docstring] if constructor else [obj.docstring]
            problems += [f"{qualname}: {p}" for p in _undocumented_raises(obj, docs)]
    assert not problems, "\n".join(problems)


def test_raise_scan_finds_raises_and_skips_nested_functions() -> None:
    source = textwrap.dedent(
        """
        def f(x):
            if x:
                raise ValueError("x")
            def inner():
                raise KeyError("nested: not f's")
            try:
                pass
            except OSError as err:
                raise tracin.DataError("d") from err
            raise
        """
    )
    assert _raised_names(source) == {"ValueError", "DataError"}
