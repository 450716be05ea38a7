"""The CLI's spec: a Python file the user writes that names the model, task, data and checkpoints.

Names the spec defines (module level):

- ``model``: an ``nn.Module``, or a function returning one (weights come from the checkpoints);
- ``task``: a `tracin.Task`;
- ``checkpoints``: a `tracin.Checkpoints` (with learning rates);
- ``train``: the training Dataset (or unshuffled DataLoader);
- ``queries`` (optional): ``{name: Dataset}`` of query examples to featurize and explain;
- ``render`` (optional): ``render(split, index) -> {"label": ..., "image" | "text" | "row": ...}``
  for the report;
- ``layers``, ``embedding_layer`` (optional): as in `tracin.featurize`.

The spec is your own code and runs as such; the CLI reads nothing else from it.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tracin._errors import ConfigError, TracInError
from tracin._task import Task
from tracin.checkpoints._checkpoints import Checkpoints

__all__ = ["Spec", "load_spec"]


@dataclass
class Spec:
    """What a spec file defines."""

    model: nn.Module
    task: Task
    checkpoints: Checkpoints
    train: Any
    queries: dict[str, Any]
    render: Any
    layers: list[str] | None
    embedding_layer: str | None


def _where(exc: BaseException, file: Path) -> str:
    """``line N: Type: message`` of the deepest frame of ``exc`` inside ``file``."""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == file.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{'' if line is None else f'line {line}: '}{type(exc).__name__}: {text}"


def load_spec(path: str | Path) -> Spec:
    """Run the spec file and collect what it defines, checking each name's type.

    Raises:
        ConfigError: the file is missing, or a required name is missing or of the wrong type.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"spec file {str(file)!r} does not exist; see `tracin featurize --help`")
    name = f"tracin_spec_{file.stem}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(
            f"cannot load {str(file)!r} as Python; the spec is a .py file (see `tracin --help`)"
        )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so the source of its classes (a Task's) can be read back
    sys.path.insert(0, str(file.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    except TracInError:
        raise
    except Exception as exc:  # the user's code: one line naming the file, line and error
        raise ConfigError(f"spec {str(file)!r} failed to run: {_where(exc, file)}") from exc
    finally:
        sys.path.pop(0)
    ns = vars(module)
    model = ns.get("model")
    if callable(model) and not isinstance(model, nn.Module):
        model = model()
    checks = {"model": (model, nn.Module), "task": (ns.get("task"), Task),
              "checkpoints": (ns.get("checkpoints"), Checkpoints)}  # fmt: skip
    for name, (value, kind) in checks.items():
        if not isinstance(value, kind):
            raise ConfigError(
                f"spec {str(file)!r}: `{name}` is {type(value).__name__}, expected "
                f"{kind.__name__}; define it at module level"
            )
    if ns.get("train") is None:
        raise ConfigError(f"spec {str(file)!r}: define `train`, the training Dataset")
    queries = ns.get("queries") or {}
    if not isinstance(queries, dict):
        raise ConfigError(f"spec {str(file)!r}: `queries` must be a dict of name -> Dataset")
    if ns.get("render") is not None and not callable(ns["render"]):
        raise ConfigError(
            f"spec {str(file)!r}: `render` is {type(ns['render']).__name__}; define it as a "
            "function render(split, index) -> dict"
        )
    assert isinstance(model, nn.Module)  # checked above
    return Spec(model, ns["task"], ns["checkpoints"], ns["train"], dict(queries),
                ns.get("render"), ns.get("layers"), ns.get("embedding_layer"))  # fmt: skip
