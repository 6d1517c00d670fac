"""`pixtral-cpp cache`: the prompt cache on disk, its size and entries; `pixtral-cpp cache clear` empties it."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pixtral_cpp.defaults import DISK_CACHE_ENV, DISK_CACHE_MAX_BYTES
from pixtral_cpp.formatting import format_bytes


@click.group(invoke_without_command=True)
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              help=f"The cache folder (default: ${DISK_CACHE_ENV}, else the user's cache folder).")
@click.pass_context
def cache(ctx: click.Context, folder: Path | None) -> None:
    """The prompt cache on disk: its folder, size and entries; `cache clear` empties it.

    Each entry is an evaluated prompt prefix (through its last image, or a whole long prompt) of one model
    and its settings; a later process that asks about the same image restores it instead of evaluating it."""
    from pixtral_cpp.paths import default_prompt_cache_dir

    ctx.obj = folder or default_prompt_cache_dir()
    if ctx.invoked_subcommand is None:
        show(ctx.obj)


def show(folder: Path) -> None:
    from pixtral_cpp.disk_cache import entries

    found = entries(folder)
    total = sum(e.size for e in found)
    click.echo(f"{folder}: {_entries(len(found))}, {format_bytes(total)} "
               f"(limit {format_bytes(DISK_CACHE_MAX_BYTES)} unless a model sets another)")
    if not found:
        return
    rows = [("POSITIONS", "SIZE", "LAST USED", "ENTRY")]
    rows += [(str(e.positions), format_bytes(e.size), time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)),
              e.path.name) for e in reversed(found)]  # most recently used first
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])


@cache.command("clear")
@click.pass_obj
def clear(folder: Path) -> None:
    """Remove every entry of the prompt cache (answers stay correct; the next ones evaluate their prompts again)."""
    from pixtral_cpp.disk_cache import clear as clear_folder
    from pixtral_cpp.disk_cache import entries

    count = len(entries(folder))
    freed = clear_folder(folder)
    click.echo(f"removed {_entries(count)} ({format_bytes(freed)}) from {folder}")


def _entries(count: int) -> str:
    return f"{count} {'entry' if count == 1 else 'entries'}"
