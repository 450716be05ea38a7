"""Write result tables for people (a terminal table) and for scripts (CSV, JSON, Parquet)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracin._errors import ConfigError, MissingDependencyError
from tracin._io import atomic_write, not_writable

__all__ = ["FORMATS", "write_table"]

FORMATS = ("table", "csv", "json", "parquet")


def write_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: str,
    output: Path | None,
    console: Any,
    title: str = "",
) -> None:
    """Show ``rows`` as a table, or write them as CSV/JSON/Parquet to ``output`` (or stdout).

    Raises:
        ConfigError: an unknown format, or an output that is a folder or cannot be written.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}; expected one of {list(FORMATS)}")
    if output is not None and output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a folder; pass a file path in it")
    try:
        _write(columns, rows, fmt, output, console, title)
    except OSError as exc:
        if output is None:  # stdout closed early (e.g. piped into head): the caller's business
            raise
        raise ConfigError(not_writable(output.parent, exc)) from exc


def _write(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: str,
    output: Path | None,
    console: Any,
    title: str,
) -> None:
    if fmt == "table":
        from rich.table import Table

        table = Table(title=title or None)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)
        return
    if fmt == "parquet":
        _parquet(columns, rows, output)
        return
    buf = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        json.dump([dict(zip(columns, row, strict=True)) for row in rows], buf, indent=1)
        buf.write("\n")
    if output is None:
        console.file.write(buf.getvalue())
    else:
        atomic_write(output, buf.getvalue().encode())


def _parquet(columns: Sequence[str], rows: Sequence[Sequence[Any]], output: Path | None) -> None:
    if output is None:
        raise ConfigError("--format parquet needs --output FILE")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(
            "--format parquet needs pyarrow: pip install pyarrow"
        ) from None
    table = pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)})
    output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, output)
