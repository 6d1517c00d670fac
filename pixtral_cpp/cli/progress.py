"""A terminal progress bar with bytes and ETA, for the CLI only."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import click

from pixtral_cpp.formatting import format_bytes


class TerminalProgress:
    """Redraws one line on a terminal; on a pipe prints one line per finished step instead."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None, *,
                 show_speed: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.show_speed = show_speed  # downloads: bytes per second on the line and in the summary
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.label, self.total, self.unit, self.done = "", 0, "bytes", 0
        self.started = self.last_draw = 0.0

    def begin(self, label: str, total: int, unit: str = "bytes") -> None:
        self.label, self.total, self.unit, self.done = label, max(total, 1), unit, 0
        self.started = time.monotonic()
        self._draw(force=True)

    def advance(self, amount: int) -> None:
        self.done += amount
        self._draw()

    def end(self) -> None:
        self.done = self.total
        seconds = time.monotonic() - self.started
        if self.interactive:
            self._draw(force=True)
            click.echo("", file=self.stream)
        else:
            speed = f" ({format_bytes(self.total / max(seconds, 1e-6))}/s)" if self.show_speed else ""
            click.echo(f"{self.label}: {self._amount(self.total)} in {seconds:.1f} s{speed}", file=self.stream)

    def _amount(self, n: int) -> str:
        return format_bytes(n) if self.unit == "bytes" else f"{n} {self.unit}"

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.interactive or (not force and now - self.last_draw < 0.1):
            return
        self.last_draw = now
        fraction = min(self.done / self.total, 1.0)
        elapsed = max(now - self.started, 1e-6)
        eta = f"ETA {elapsed * (1 - fraction) / fraction:5.0f} s" if 0 < fraction < 1 else " " * 11
        label, width = (36, 24) if self.show_speed else (44, 30)  # the speed takes its room from label and bar
        speed = f" {(format_bytes(self.done / elapsed) + '/s') if self.done else '':>11}" if self.show_speed else ""
        line = (f"\r{self.label:<{label}.{label}} [{'#' * int(fraction * width):<{width}}] "
                f"{self._amount(self.done):>9}/{self._amount(self.total):<9}{speed} {eta}")
        click.echo(line, file=self.stream, nl=False)
