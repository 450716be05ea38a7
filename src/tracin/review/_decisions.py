"""The decisions file: one JSON line per decision, appended and fsynced as it is made.

``<store>/decisions.jsonl`` holds lines ``{"row", "decision", "label", "given", "time"}``:
``decision`` is ``"keep"``, ``"relabel"`` (``label`` = the new class), ``"remove"`` or
``"clear"`` (undo: the row is undecided again); ``given`` is the row's label when the decision
was made (``null`` if unknown); ``time`` is UTC ISO 8601. The last line for a row wins. Lines
are only ever appended, so two writers (two browser tabs, through one server) never lose each
other's decisions, and a killed server loses at most a line it never acknowledged.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from tracin._errors import ConfigError, DataError
from tracin._io import atomic_write, not_writable

__all__ = [
    "DECISIONS_FILE",
    "Decision",
    "DecisionLog",
    "ReviewedLabels",
    "apply_decisions",
    "export_decisions",
    "read_decisions",
]

DECISIONS_FILE = "decisions.jsonl"
Kind = Literal["keep", "relabel", "remove", "clear"]
KINDS: tuple[str, ...] = ("keep", "relabel", "remove", "clear")


@dataclass(frozen=True)
class Decision:
    """One reviewer decision about a training row.

    Attributes:
        row: training row index.
        decision: ``"keep"``, ``"relabel"``, ``"remove"`` or ``"clear"`` (undecided again).
        label: the new class for ``"relabel"``, else ``None``.
        given: the row's given label when decided, if known.
        time: UTC time, ISO 8601.
    """

    row: int
    decision: Kind
    label: int | None = None
    given: int | None = None
    time: str = ""

    def to_json(self) -> str:
        """The decision as one line of JSON (no newline)."""
        return json.dumps({"row": self.row, "decision": self.decision, "label": self.label,
                           "given": self.given, "time": self.time})  # fmt: skip

    @property
    def new_label(self) -> int | None:
        """The label after the decision: given (keep), the new class (relabel), else None."""
        if self.decision == "relabel":
            return self.label
        return self.given if self.decision == "keep" else None


def make_decision(
    row: Any, decision: Any, label: Any = None, given: int | None = None, n_rows: int | None = None
) -> Decision:
    """A validated `Decision` stamped with the current time.

    Raises:
        ConfigError: an unknown decision, a row outside ``0..n_rows-1``, or a relabel without
            an integer class ``>= 0``.
    """
    if decision not in KINDS:
        raise ConfigError(f"decision={decision!r}; expected one of {list(KINDS)}")
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise ConfigError(f"row={row!r}: a training row is an integer >= 0")
    if n_rows is not None and row >= n_rows:
        raise ConfigError(f"row={row} is outside the training rows 0..{n_rows - 1}")
    if decision == "relabel":
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ConfigError(f"relabel needs label=<class index >= 0>; got {label!r}")
    else:
        label = None
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return Decision(row, decision, label, given, now)


def _parse(line: str, where: str) -> Decision:
    try:
        obj = json.loads(line)
        decision = Decision(int(obj["row"]), obj["decision"], obj.get("label"),
                            obj.get("given"), str(obj.get("time", "")))  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{where}: not a decision line ({exc}); fix or delete that line of the file"
        ) from None
    if decision.decision not in KINDS:
        raise DataError(f"{where}: unknown decision {decision.decision!r}; expected {list(KINDS)}")
    return decision


def _decisions_path(store_or_file: str | Path) -> Path:
    path = Path(store_or_file)
    return path / DECISIONS_FILE if path.is_dir() else path


def read_decisions(store_or_file: str | Path) -> dict[int, Decision]:
    """The current decision of every decided row (the last line per row wins).

    Args:
        store_or_file: a store folder (reads ``decisions.jsonl`` in it) or the file itself.

    Returns:
        ``{row: Decision}``; rows whose last decision is ``"clear"`` are left out. A missing
        file gives ``{}``. A last line cut short (a crash mid-write) is ignored.

    Raises:
        DataError: a line other than the last is not a decision.
    """
    path = _decisions_path(store_or_file)
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    current: dict[int, Decision] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if i == len(lines) - 1:  # no newline after it: written partially when a server died
            break
        d = _parse(line, f"{path} line {i + 1}")
        if d.decision == "clear":
            current.pop(d.row, None)
        else:
            current[d.row] = d
    return current


class DecisionLog:
    """Append-only, fsynced decisions file with the current state in memory (thread-safe).

    Args:
        store: the store folder; the file is ``store/decisions.jsonl``.
        n_rows: training rows (decisions outside ``0..n_rows-1`` are refused).

    Raises:
        DataError: the existing file has a malformed line.
        ConfigError: the folder cannot be written.
    """

    def __init__(self, store: str | Path, n_rows: int) -> None:
        self.path = Path(store) / DECISIONS_FILE
        self.n_rows = n_rows
        self._lock = threading.Lock()
        self._drop_partial_tail()
        self.current = read_decisions(self.path)
        bad = [r for r in self.current if r >= n_rows]
        if bad:
            raise DataError(
                f"{self.path} has a decision for row {bad[0]}, but the store has {n_rows} "
                "training rows; is it another store's file? Move it away to start afresh"
            )
        self.version = 0

    def _drop_partial_tail(self) -> None:
        """Cut a last line without its newline (never acknowledged) so appends stay lines."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def record(self, decision: Decision) -> Decision:
        """Append ``decision`` (fsynced before returning) and update the current state.

        Raises:
            ConfigError: the row is outside the store, or the file cannot be written.
        """
        if not 0 <= decision.row < self.n_rows:
            raise ConfigError(f"row={decision.row} is outside the rows 0..{self.n_rows - 1}")
        line = (decision.to_json() + "\n").encode("utf-8")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise ConfigError(not_writable(self.path.parent, exc)) from exc
            if decision.decision == "clear":
                self.current.pop(decision.row, None)
            else:
                self.current[decision.row] = decision
            self.version += 1
        return decision

    def snapshot(self) -> dict[int, Decision]:
        """A copy of the current decisions."""
        with self._lock:
            return dict(self.current)


class ReviewedLabels(NamedTuple):
    """A dataset's labels after review: ``labels`` ``(N,)`` relabelled; ``kept`` row indices."""

    labels: np.ndarray
    kept: np.ndarray


def apply_decisions(decisions: str | Path | Mapping[int, Decision], labels: Any) -> ReviewedLabels:
    """Apply review decisions to a dataset's labels, for retraining.

    Args:
        decisions: a store folder, a ``decisions.jsonl`` file, or ``{row: Decision}``.
        labels: the dataset's given labels, shape ``(N,)`` (array, list or tensor).

    Returns:
        `ReviewedLabels`: ``labels`` ``(N,)`` with relabelled rows changed (a copy), and
        ``kept`` the sorted indices of the rows not removed, e.g.
        ``Subset(TensorDataset(x, torch.as_tensor(labels)), kept)``.

    Raises:
        DataError: a decision names a row outside ``0..N-1``.
    """
    current = decisions if isinstance(decisions, Mapping) else read_decisions(decisions)
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    out = np.array(labels, copy=True)
    if out.ndim != 1:
        raise DataError(f"labels have shape {out.shape}; pass one label per row, shape (N,)")
    keep = np.ones(len(out), dtype=bool)
    for row, d in current.items():
        if not 0 <= row < len(out):
            raise DataError(
                f"a decision names row {row}, but labels has {len(out)} rows; pass the labels "
                "of the dataset that was reviewed"
            )
        if d.decision == "relabel":
            out[row] = d.label
        elif d.decision == "remove":
            keep[row] = False
    return ReviewedLabels(out, np.flatnonzero(keep))


def export_decisions(
    decisions: str | Path | Mapping[int, Decision], path: str | Path, given: Any = None
) -> int:
    """Write decided rows as CSV ``row,given_label,decision,new_label`` (sorted by row).

    Args:
        decisions: a store folder, a ``decisions.jsonl`` file, or ``{row: Decision}``.
        path: the CSV file to write (atomically).
        given: the dataset's labels ``(N,)``, used where a decision recorded none.

    Returns:
        The number of rows written.

    Raises:
        ConfigError: ``path`` is a folder or cannot be written.
    """
    current = decisions if isinstance(decisions, Mapping) else read_decisions(decisions)
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--export {str(out)!r} is a folder; pass a file, e.g. fixed.csv")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "given_label", "decision", "new_label"])
    for row in sorted(current):
        d = current[row]
        g = d.given if d.given is not None or given is None else int(given[row])
        new = d.label if d.decision == "relabel" else g if d.decision == "keep" else None
        writer.writerow([row, "" if g is None else g, d.decision, "" if new is None else new])
    try:
        atomic_write(out, buf.getvalue().encode("utf-8"))
    except OSError as exc:
        raise ConfigError(not_writable(out.parent, exc)) from exc
    return len(current)
