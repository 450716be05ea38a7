"""What every ``tracin`` command shares: the app, the consoles, option types, one-line errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from tracin._errors import TracInError

__all__ = ["Format", "Output", "StoreArg", "app", "console", "err", "one_line_errors"]

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


def one_line_errors(fn: F) -> F:
    """Turn a `TracInError` or `OSError` into ``tracin: error: ...`` on stderr, exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TracInError, OSError) as exc:
            text = str(exc) if isinstance(exc, TracInError) else _os_error(exc)
            line = " ".join(text.split())  # one line, whatever the message holds
            err.print(f"tracin: error: {line}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
