"""The live view of a ``dcprop check`` campaign, and its end-of-run tables.

On a terminal a :mod:`rich` live table shows, per property, the examples run, how
many reached the property's checks, new failures, examples stopped by known bugs,
the phase and the time left; elsewhere (CI logs) one plain line per property when
it ends.
"""

from __future__ import annotations

import time
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["Progress", "coverage_lines"]


class Progress:
    """Follows ``names`` (the campaign's properties, in order) on ``stream``.

    ``deadline`` is when the campaign's time budget ends (``time.monotonic()``), or
    None for a campaign sized by examples only.
    """

    def __init__(self, names: list[str], stream: IO[str], deadline: float | None) -> None:
        self.names = names
        self.deadline = deadline
        self.reports: dict[str, Any] = {}
        self.console = Console(file=stream)
        self.live: Live | None = None
        if self.console.is_terminal:
            # redrawn four times a second, so the time left counts down between examples
            self.live = Live(console=self.console, refresh_per_second=4, get_renderable=self._table)

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.stop()

    def update(self, report: Any) -> None:
        self.reports[report.name] = report

    def done(self, report: Any) -> None:
        self.update(report)
        if self.live is None:
            self.console.print(_line(report), highlight=False, soft_wrap=True)

    def _table(self) -> Table:
        left = "" if self.deadline is None else f", {self._left():.0f}s left"
        table = Table(title=f"dcprop check{left}", title_justify="left")
        for column in ("property", "phase", "examples", "checked", "failures", "known", "ex/s"):
            table.add_column(column, justify="left" if column in ("property", "phase") else "right")
        for name in self.names:
            r = self.reports.get(name)
            if r is None:
                table.add_row(name, "waiting", *[""] * 5)
                continue
            table.add_row(
                name,
                r.phase,
                str(r.examples),
                str(r.checked),
                str(max(len(r.failures), int(r.first_failure_at is not None))),
                str(r.known_examples),
                f"{r.examples / r.seconds:.2f}" if r.seconds else "",
            )
        return table

    def _left(self) -> float:
        assert self.deadline is not None
        return max(0.0, self.deadline - time.monotonic())


def _line(r: Any) -> str:
    rate = r.examples / r.seconds if r.seconds else 0.0
    return (
        f"{r.name:<16} {r.examples:>4} examples  {r.checked:>4} checked  "
        f"{len(r.failures)} failures  {r.known_examples} known  "
        f"{rate:5.2f} examples/s  {r.seconds:6.1f}s"
    )


def coverage_lines(reports: list[Any], top: int = 4) -> list[str]:
    """A short coverage table: per property and category, how many distinct values
    were run and the most frequent ones."""
    lines = []
    for r in reports:
        lines.append(f"{r.name}:")
        for category, seen in r.coverage.items():
            ranked = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"{value} {n}" for value, n in ranked[:top])
            more = f", +{len(ranked) - top} more" if len(ranked) > top else ""
            lines.append(f"  {category:<10} {len(ranked):>3} kinds: {shown}{more}")
    return lines
