"""Output files that are either complete or absent.

Everything is written under a `.partial` name beside the final file and renamed only when complete;
temporary files are removed on any failure, Ctrl-C, SIGTERM (which the CLI raises as KeyboardInterrupt)
and SystemExit included.
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
from pixtral_cpp.formatting import format_bytes

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


# errno -> why a write failed for lack of room: a full disk, a quota, or a file-size limit (RLIMIT_FSIZE, FAT32).
_NO_ROOM = {
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is too large for this file system or for the process's file-size limit",
}


@contextlib.contextmanager
def temporary_files(*paths: Path) -> Iterator[None]:
    """Remove these paths when the block ends, however it ends (Ctrl-C and SystemExit included)."""
    folder = paths[0].parent if paths else Path(".")
    try:
        yield
    except OSError as exc:
        reason = _NO_ROOM.get(exc.errno)
        if reason:
            raise OutputError(f"writing the output in {folder} failed: {reason}; free some space and run "
                              f"again (nothing was left behind)") from None
        raise OutputError(f"writing the output in {folder} failed: {exc.strerror or exc}") from None
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def publish_together(*pairs: tuple[Path, Path]) -> None:
    """fsync every (partial, final) pair's partial, then rename each into place, in order.

    If a rename fails or is interrupted, the finals already renamed are removed again: the files only
    work as a set, and a new text model beside an old mmproj would look finished but mismatch.
    """
    for partial, _ in pairs:
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
    published: list[Path] = []
    try:
        for partial, final in pairs:
            os.replace(partial, final)
            published.append(final)
        _fsync_folder(pairs[0][1].parent)
    except BaseException:
        for final in published:
            with contextlib.suppress(FileNotFoundError):
                final.unlink()
        raise


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable: without it a power cut can lose them although the data is on disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
