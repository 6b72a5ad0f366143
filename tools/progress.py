"""Progress for long ``msgr`` commands: a rich bar on a terminal, plain lines otherwise.

* stdout is a terminal: a rich bar with the count, the rate, elapsed and remaining time;
* stdout is a pipe or a file: one plain line at most every ``plain_every`` seconds and a
  last one at the end (no ANSI escapes: logs and CI stay readable);
* ``enabled=False`` (the command writes JSON to stdout): nothing at all.

No refresh thread: the caller's loop calls :meth:`Progress.update`, which redraws at most
ten times a second, so an idle terminal costs nothing and output never interleaves with
the caller's own writes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Self, TextIO

__all__ = ["Progress"]

REDRAW = 0.1  # seconds between terminal redraws


def _rich_progress(label: str, total: int | None, unit: str, stream: TextIO) -> tuple[Any, Any]:
    """A started rich Progress and its task. rich is imported only here: msgr serve
    imports this module too, and its forked workers would carry rich's objects."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-" if speed is None else f"{speed:,.0f} {unit}/s", style="progress.data.speed")

    bar = RichProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), Rate(), TextColumn("elapsed"), TimeElapsedColumn(),
        TextColumn("remaining"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=Console(file=stream), auto_refresh=False, transient=False)
    task = bar.add_task(label, total=total, info="")
    bar.start()
    return bar, task


class Progress:
    """One task's progress; use as a context manager or call :meth:`close`."""

    def __init__(self, label: str, total: int | None, unit: str = "msgs", *, enabled: bool = True,
                 stream: TextIO | None = None, plain_every: float = 1.0) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stdout
        self.plain_every = plain_every
        self.mode = "off" if not enabled else ("rich" if self.stream.isatty() else "plain")
        self.start = time.monotonic()
        self.completed = 0
        self._fields: dict[str, object] = {}
        self._last = 0.0
        self._rich: Any = None  # rich.progress.Progress on a terminal
        if self.mode == "rich":
            self._rich, self._task = _rich_progress(label, total, unit, self.stream)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, completed: int, total: int | None = None, **fields: object) -> None:
        """Set the count (and optionally the total); ``fields`` are shown as ``key value``.

        Cheap enough for every loop iteration: it draws only every ``REDRAW`` (terminal)
        or ``plain_every`` (plain) seconds."""
        self.completed = completed
        if total is not None:
            self.total = total
        if fields:
            self._fields = fields
        if self.mode == "off":
            return
        now = time.monotonic()
        if now - self._last < (REDRAW if self._rich is not None else self.plain_every):
            return
        self._last = now
        self._draw(now)

    @property
    def info(self) -> str:
        return "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in self._fields.items())

    def _draw(self, now: float) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=self.completed, total=self.total, info=self.info)
            self._rich.refresh()
        else:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.completed / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.completed}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit} ({100 * self.completed / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{rate:,.0f} {self.unit}/s")
        parts.append(f"elapsed {elapsed:.1f}s")
        if self.total and rate > 0:
            parts.append(f"remaining {max(0.0, (self.total - self.completed) / rate):.1f}s")
        if self.info:
            parts.append(self.info)
        self.stream.write("  ".join(parts) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state once and stop (idempotent)."""
        if self.mode == "off":
            return
        self._draw(time.monotonic())
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        self.mode = "off"
