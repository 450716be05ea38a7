"""What every ``tracin`` command shares: the app, the consoles, option types, one-line errors."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from tracin._errors import TracInError

__all__ = [
    "Format",
    "Output",
    "CliOption",
    "StoreArg",
    "app",
    "console",
    "err",
    "one_line_errors",
    "option_names",
]

app = typer.Typer(
    name="tracin",
    help="TracIn: which training examples made a model predict what it predicts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

Format = Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet")]
Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="write to this file (default: stdout)")
]
StoreArg = Annotated[Path, typer.Argument(help="run directory written by `tracin featurize`")]


def _os_error(exc: OSError) -> str:
    """An operating-system error as the one thing to fix, e.g. ``Permission denied: 'runs/x'``."""
    where = " -> ".join(repr(str(f)) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    return (f"{what}{': ' + where if where else ''} (check that the path exists, is a folder where "
            "one is expected, and that you may write there)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CliOption:
    """How a parameter is typed: ``--k``; a flag's ``--overwrite`` (``off``: ``--no-overwrite``)."""

    name: str
    flag: bool = False
    off: str | None = None


def _command_options() -> dict[str, CliOption]:
    """``{parameter name: option}`` of the running command, e.g. ``{"fmt": "--format"}``.

    Empty outside a command. Typer >= 0.22 runs its own copy of click (``typer._click``);
    earlier versions run click itself.
    """
    import typer.main

    current = getattr(typer.main, "get_current_context", None)
    if current is None:  # pragma: no cover - typer < 0.22, which depends on click
        import click

        current = click.get_current_context
    ctx = current(silent=True)
    if ctx is None:
        return {}
    found = {}
    for param in ctx.command.params:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        if getattr(param, "param_type_name", None) != "option" or not param.name or not opts:
            continue
        off = next((o for o in getattr(param, "secondary_opts", []) if o.startswith("--")), None)
        found[param.name] = CliOption(opts[0], bool(getattr(param, "is_flag", False)), off)
    return found


def option_names(text: str, options: dict[str, CliOption] | None = None) -> str:
    """A library message in the command's own option names: ``k=0`` becomes ``--k 0``.

    Library errors name Python arguments (``k=0 must be ...``, ``e.g. batch_size=64``); each
    ``name=`` whose ``name`` is an option of the running command becomes that option as typed
    (its long form, e.g. ``--proj-dim``; a flag's ``overwrite=True`` becomes ``--overwrite``).
    Other ``name=`` (a spec's ``layers=``, a task's ``labels=``) stay: the user wrote those in
    Python.

    Args:
        text: the message.
        options: ``{parameter name: option}`` (default: the running command's).
    """
    for name, option in (_command_options() if options is None else options).items():
        at = rf"(?<![\w.\-]){re.escape(name)}="
        if option.flag:
            text = re.sub(at + r"True\b", option.name, text)
            if option.off is not None:
                text = re.sub(at + r"False\b", option.off, text)
        text = re.sub(at, f"{option.name} ", text)
    return re.sub(r"(--[\w-]+) \(\1\)", r"\1", text)  # "--overwrite (--overwrite)"


def one_line_errors(fn: F) -> F:
    """Turn a `TracInError` or `OSError` into ``tracin: error: ...`` on stderr, exit status 2.

    The message names the command's options as typed (`option_names`); no traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TracInError, OSError) as exc:
            text = option_names(str(exc)) if isinstance(exc, TracInError) else _os_error(exc)
            line = " ".join(text.split())  # one line, whatever the message holds
            err.print(f"tracin: error: {line}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
