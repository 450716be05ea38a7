"""Write result tables for people (a terminal table) and for scripts (CSV, JSON, Parquet)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracin._errors import ConfigError
from tracin._store import atomic_write

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
    """Show ``rows`` as a table, or write them as CSV/JSON/Parquet to ``output`` (or stdout)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}; expected one of {list(FORMATS)}")
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
        raise ConfigError("--format parquet needs pyarrow: pip install pyarrow") from None
    table = pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)})
    output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, output)
