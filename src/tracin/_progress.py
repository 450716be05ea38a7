"""Progress on the command line: bars with an ETA on a terminal, log lines everywhere else.

The library reports progress through one callback, ``progress(stage, advance, total)``: ``advance``
more rows of ``total`` are done in ``stage`` (featurize calls it after every batch; a `Run`'s
scoring and clustering passes after every block). A stage that finishes and then advances again is
a new pass over the same rows (k-means iterations, one scoring pass per checkpoint).
`ProgressReporter` turns the calls into Rich bars when its console is a terminal and into a line
every ``interval`` seconds when it is not (plus one when a stage that printed one completes), so
a log file of a long job shows how far it got and how long it has left, and a short job prints
nothing. The CLI's interval is ``TRACIN_PROGRESS_INTERVAL`` seconds (default 10).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ProgressReporter", "attached", "interval_from_env", "plan_printer"]


@dataclass
class _Stage:
    total: int
    started: float
    done: int = 0
    passes: int = 1
    printed: float = 0.0
    lines: int = 0
    task: TaskID | None = field(default=None)


class ProgressReporter:
    """A ``progress(stage, advance, total)`` callback that shows bars or writes log lines.

    Args:
        console: where to draw; bars when ``console.is_terminal``, log lines otherwise.
        enabled: ``False`` shows nothing (e.g. on torchrun ranks other than 0).
        interval: seconds between log lines of one stage (non-terminal output).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        console: Console,
        *,
        enabled: bool = True,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.enabled = enabled
        self.interval = interval
        self.clock = clock
        self.stages: dict[str, _Stage] = {}
        self._bars: Progress | None = None
        if enabled and console.is_terminal:
            self._bars = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("rows"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console, transient=True,
            )  # fmt: skip

    def __enter__(self) -> ProgressReporter:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, stage: str, advance: int, total: int | None) -> None:
        """Record ``advance`` more rows of ``total`` in ``stage``; draw or log."""
        if not self.enabled:
            return
        now = self.clock()
        size = int(total or 0)
        state = self.stages.get(stage)
        if state is None:
            state = self.stages[stage] = _Stage(size, now, printed=now)
            if self._bars is not None:
                state.task = self._bars.add_task(stage, total=size or None)
        elif state.total and state.done >= state.total:  # a new pass over the same rows
            state.passes += 1
            state.done, state.started, state.total = 0, now, size
            if self._bars is not None and state.task is not None:
                name = f"{stage} (pass {state.passes})"
                self._bars.reset(state.task, total=size or None, description=name)
        state.done += advance
        if self._bars is not None and state.task is not None:
            self._bars.advance(state.task, advance)
            return
        self._log(stage, state, now)

    def _log(self, stage: str, state: _Stage, now: float) -> None:
        """A line ``interval`` seconds after the last, and at the end of a stage that printed.

        Repeated passes (k-means iterations) print at most one line per interval.
        """
        finished = bool(state.total) and state.done >= state.total
        closing = finished and state.passes == 1 and state.lines > 0
        if now - state.printed < self.interval and not closing:
            return
        state.printed = now
        state.lines += 1
        elapsed = now - state.started
        name = stage if state.passes == 1 else f"{stage} (pass {state.passes})"
        if finished:
            line = f"{name}: {state.done:,} rows done in {elapsed:.1f} s"
        else:
            line = f"{name}: {state.done:,}/{state.total:,} rows{_share(state)}, {elapsed:.1f} s"
            line += _eta(state, elapsed)
        self.console.print(f"tracin: {line}", markup=False, highlight=False, soft_wrap=True)


def _share(state: _Stage) -> str:
    return f" ({100 * state.done / state.total:.0f}%)" if state.total else ""


def _eta(state: _Stage, elapsed: float) -> str:
    if not state.total or state.done <= 0:
        return ""
    return f", ETA {elapsed * (state.total - state.done) / state.done:.0f} s"


def interval_from_env(default: float = 10.0) -> float:
    """Seconds between log lines: ``TRACIN_PROGRESS_INTERVAL``, else ``default``."""
    try:
        return max(0.0, float(os.environ.get("TRACIN_PROGRESS_INTERVAL", default)))
    except ValueError:
        return default


def plan_printer(console: Console) -> Callable[[Any], None]:
    """An ``on_plan`` callback for `tracin.featurize` that prints the store's size."""

    def show(plan: Any) -> None:
        console.print(f"tracin: store: {plan.describe()}", markup=False, highlight=False,
                      soft_wrap=True)  # fmt: skip

    return show


@contextmanager
def attached(run: Any, console: Console) -> Iterator[ProgressReporter]:
    """Report ``run``'s scoring and clustering passes (`tracin.Run.progress`) while inside."""
    with ProgressReporter(console, interval=interval_from_env()) as reporter:
        run.progress = reporter
        try:
            yield reporter
        finally:
            run.progress = None
