"""Progress reporting: the library reports, the CLI draws (the library never prints)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def begin(self, label: str, total: int, unit: str = "bytes") -> None: ...

    def advance(self, amount: int) -> None: ...

    def end(self) -> None: ...


class NullProgress:
    """Reports nowhere: for quiet runs and library callers that do not care."""

    def begin(self, label: str, total: int, unit: str = "bytes") -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def end(self) -> None:
        pass
