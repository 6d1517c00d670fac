"""A terminal progress bar with bytes and ETA, for the CLI only."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import click

from pixtral_cpp.formatting import format_bytes


class TerminalProgress:
    """Redraws one line on a terminal; on a pipe prints one line per finished step instead."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stderr
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
            click.echo(f"{self.label}: {self._amount(self.total)} in {seconds:.1f} s", file=self.stream)

    def _amount(self, n: int) -> str:
        return format_bytes(n) if self.unit == "bytes" else f"{n} {self.unit}"

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.interactive or (not force and now - self.last_draw < 0.1):
            return
        self.last_draw = now
        fraction = min(self.done / self.total, 1.0)
        bar = "#" * int(fraction * 30)
        elapsed = now - self.started
        eta = f"ETA {elapsed * (1 - fraction) / fraction:4.0f} s" if 0 < fraction < 1 else " " * 10
        line = f"\r{self.label:<44.44} [{bar:<30}] {self._amount(self.done):>9}/{self._amount(self.total):<9} {eta}"
        click.echo(line, file=self.stream, nl=False)
