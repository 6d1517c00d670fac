"""The `pixtral-cpp` command line: parsing and printing over the library's public API.

One module per command (convert, describe, chat, info, batch, serve, doctor, backend), each imported
only when its command runs (see group.py); options, progress and formatting are shared by several.
"""

from __future__ import annotations

from pixtral_cpp.cli.group import RAISE_ENV, Terminated, main

__all__ = ["RAISE_ENV", "Terminated", "main"]
