"""Output files that are either complete or absent.

Everything is written under a `.partial` name beside the final file and renamed only when complete;
temporary files are removed on any failure, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pixtral_cpp.errors import OutputError

PARTIAL_SUFFIX = ".partial"
# Metadata (vocabulary, merges, template) and alignment padding, on top of the tensor bytes.
METADATA_ALLOWANCE = 64 * 1024 * 1024


def prepare_output_dir(folder: Path) -> None:
    """Create the folder and prove it is writable, before any long work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pixtral-cpp-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None


def refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise OutputError(f"output already exists: {', '.join(existing)} (use --force to overwrite)")


def check_free_space(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OutputError(f"not enough free disk space in {folder}: conversion needs {format_bytes(needed_bytes)}, "
                          f"{format_bytes(free)} is free")


def partial_path(final: Path, tag: str = "") -> Path:
    """A temporary name that no tool mistakes for a finished GGUF."""
    return final.with_name(f".{final.name}{tag}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def temporary_files(*paths: Path) -> Iterator[None]:
    """Remove these paths when the block ends, however it ends."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"the disk filled up while writing {exc.filename or 'the output'}; "
                              f"free some space and run again") from None
        raise
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def publish(partial: Path, final: Path) -> None:
    """fsync and atomically rename a completed file into place."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
