"""Describe many images one by one into a JSONL file that survives interruptions and resumes.

    images = collect_images(["photos/"])
    summary = run_batch(model, images, "answers.jsonl", prompt="What is in this picture?")

Each line of the output is one record: {"path", "answer", "error", "stats", "prompt"}. The file is
the batch's only state:

- An image counts as done when the file holds a record for its path *and the same prompt*, so
  one file can collect the answers of several prompts, and a re-run with the same prompt describes
  only what is missing. Failed images are done too (their record holds the error): the failures
  recorded are properties of the file (corrupt, not an image), so retrying unchanged gives the same
  error. After fixing the files, `retry_failed=True` (`--retry-failed`) tries the images whose
  latest record for the prompt is an error again; the new record is appended and, when reading, the
  latest record of a path and prompt is the one that counts. Nothing is ever rewritten in place.
- Records are appended one complete line per write, flushed and fsynced, so an interruption
  (Ctrl-C, kill, power loss) loses at most the image in progress. A partial last line left by an
  interrupted write is cut off on the next run; a complete line that is not a record is an error,
  never silently dropped (the file may not be ours).
- Only errors that belong to one image (ImageError: unreadable, corrupt, not an image) are
  recorded. Anything else (the backend, the model, a context too small for the image budget) would
  fail every image in the same way and, once recorded, would mark them all done: it stops the
  batch instead, with the file valid, so a re-run after the fix carries on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pixtral_cpp.errors import ImageError, OutputError
from pixtral_cpp.model import DEFAULT_PROMPT, PixtralModel
from pixtral_cpp.options import GenerationOptions

# What a folder is expanded to (lower-cased suffixes); files named explicitly are taken whatever
# their suffix, a failure to read them is recorded like any other bad image.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class BatchRecord:
    """One line of the output: the answer and its statistics, or the error."""

    path: str  # absolute, so a re-run from another working folder still finds it done
    answer: str | None
    error: str | None
    stats: dict[str, Any] | None  # GenerationStats.to_dict()
    prompt: str

    def to_line(self) -> bytes:
        # UTF-8, readable in any language; a file name that is not UTF-8 reaches us surrogate-escaped,
        # and backslashreplace writes those as \udcXX, a JSON escape that reads back to the same name
        return (json.dumps(asdict(self), ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class BatchProgress:
    """Sent to on_progress once before the first image (record None) and after each image is saved."""

    completed: int  # images finished in this run, failed ones included
    total: int  # images this run has to do (the already done ones are not counted)
    skipped: int  # images already done in the output file
    record: BatchRecord | None


@dataclass(frozen=True)
class BatchSummary:
    done: int  # described in this run
    skipped_already_done: int  # found in the output file with the same prompt
    failed: int  # recorded with an error in this run
    seconds: float
    retried: int = 0  # of this run's images, those whose earlier record was an error (retry_failed)


# ---------------------------------------------------------------------------------------------------
# Inputs


def collect_images(inputs: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); each image once, by resolved path."""
    images: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        for path in _expand(Path(item), recursive):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                images.append(path)
    if not images:
        names = ", ".join(str(item) for item in inputs) or "no inputs"
        raise ImageError(f"no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in {names}")
    return images


def _expand(path: Path, recursive: bool) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ImageError(f"{path}: {'not a file or folder' if path.exists() else 'no such file or folder'}")
    candidates = path.rglob("*") if recursive else path.iterdir()
    # Hidden files are skipped: macOS's ._photo.jpg resource forks would each be a recorded failure.
    return sorted(p for p in candidates
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


# ---------------------------------------------------------------------------------------------------
# Running


def run_batch(model: PixtralModel, images: Iterable[str | os.PathLike[str]],
              out_path: str | os.PathLike[str], *, prompt: str = DEFAULT_PROMPT,
              generation: GenerationOptions | None = None,
              on_progress: Callable[[BatchProgress], None] | None = None,
              retry_failed: bool = False) -> BatchSummary:
    """Describe each image not yet in `out_path` for this prompt, appending one record per image;
    with `retry_failed`, also those whose latest record for this prompt is an error.

    A KeyboardInterrupt (also one raised by on_progress) propagates after the last finished record
    is safely on disk. Errors other than ImageError stop the batch (see the module docstring).
    """
    generation = generation or GenerationOptions()
    with open_batch(images, out_path, prompt, retry_failed, on_progress) as batch:
        for path in batch.pending:
            batch.save(_describe_one(model, path, prompt, generation))
    return batch.summary()


class PendingBatch:
    """What a run has to do, and the one writer of its records: local and remote batches share it
    (pixtral_cpp.remote_batch), so both keep the same file and resume rules."""

    def __init__(self, output: _RecordFile, pending: list[Path], skipped: int, retried: int,
                 on_progress: Callable[[BatchProgress], None] | None) -> None:
        self.pending = pending  # absolute paths, each image once, in the order given
        self.skipped, self.retried = skipped, retried
        self.described = self.failed = 0
        self._output, self._report = output, on_progress or (lambda _: None)
        self._started = time.monotonic()

    def save(self, record: BatchRecord) -> None:
        """Append `record` durably, then report it; call from one thread only."""
        self._output.append(record)
        self.described += record.error is None
        self.failed += record.error is not None
        self._report(BatchProgress(self.described + self.failed, len(self.pending), self.skipped, record))

    def summary(self) -> BatchSummary:
        return BatchSummary(self.described, self.skipped, self.failed, time.monotonic() - self._started,
                            self.retried)


@contextmanager
def open_batch(images: Iterable[str | os.PathLike[str]], out_path: str | os.PathLike[str], prompt: str,
               retry_failed: bool = False, on_progress: Callable[[BatchProgress], None] | None = None
               ) -> Iterator[PendingBatch]:
    """Lock and read `out_path`, work out which images still need an answer for `prompt`, report the
    start (record None) and hand over the writer; the file is closed (and unlocked) on leaving."""
    unique = _unique_absolute(images)
    with _RecordFile(Path(out_path)) as output:
        done, failed_before = output.done_paths(prompt, retry_failed)
        pending = [path for resolved, path in unique.items() if resolved not in done]
        retried = sum(resolved in failed_before for resolved in unique if resolved not in done)
        batch = PendingBatch(output, pending, len(unique) - len(pending), retried, on_progress)
        batch._report(BatchProgress(0, len(pending), batch.skipped, None))
        yield batch


def _unique_absolute(images: Iterable[str | os.PathLike[str]]) -> dict[Path, Path]:
    """Resolved path -> absolute path, first occurrence wins (callers may pass duplicates)."""
    unique: dict[Path, Path] = {}
    for image in images:
        path = Path(image).absolute()
        unique.setdefault(_resolved(path), path)
    return unique


def _resolved(path: Path) -> Path:
    """The resolved path, or the path itself where it cannot be resolved (a symlink loop, a NUL in
    the name): describing it then records the problem like any other unreadable image."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return path


def _describe_one(model: PixtralModel, path: Path, prompt: str, generation: GenerationOptions) -> BatchRecord:
    try:
        completion = model.describe(path, prompt, generation)
    except ImageError as exc:
        return BatchRecord(str(path), None, str(exc), None, prompt)
    return BatchRecord(str(path), completion.text, None, completion.stats.to_dict(), prompt)


# ---------------------------------------------------------------------------------------------------
# The output file


class _RecordFile:
    """The JSONL output, locked against a second batch, repaired on open, appended durably."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            raise OutputError(f"{path} is a folder; give the JSONL file to write, "
                              f"e.g. {path / 'answers.jsonl'}")
        if not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: the folder {path.parent} does not exist")
        self.path = path
        self._fd = -1
        # (path, prompt) -> whether the latest record of that pair is an error; answers stay on disk
        self._latest: dict[tuple[str, str], bool] = {}

    def __enter__(self) -> _RecordFile:
        created = not self.path.exists()
        try:
            # O_APPEND: every write lands at the end, whatever a reader or we did to the offset.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            _lock(self._fd, self.path)
            if created:
                _fsync_folder(self.path.parent)
            self._latest = self._read_and_repair()
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # also releases the lock

    def done_paths(self, prompt: str, retry_failed: bool = False) -> tuple[set[Path], set[Path]]:
        """(resolved paths done for `prompt`, those of them whose latest record is an error); with
        `retry_failed` the failed ones are not done."""
        latest = {(_resolved(Path(path)), failed) for (path, asked), failed in self._latest.items() if asked == prompt}
        failed = {path for path, is_error in latest if is_error}
        done = {path for path, is_error in latest if not (is_error and retry_failed)}
        return done, failed

    def append(self, record: BatchRecord) -> None:
        line = memoryview(record.to_line())
        try:
            while line:  # os.write may write less than asked (a signal, a nearly full disk): finish it
                line = line[os.write(self._fd, line):]
            os.fsync(self._fd)
        except OSError as exc:  # a partial line is cut off by the next run, like an interruption
            raise OutputError(f"cannot write to {self.path}: {exc.strerror}; the records before this one "
                              "are safe, run the batch again to resume") from exc
        _note(self._latest, record.path, record.prompt, record.error)

    def _read_and_repair(self) -> dict[tuple[str, str], bool]:
        """(path, prompt) -> failed, of the records already written, the latest record of a pair
        winning; a partial last line (an interrupted write) is cut off."""
        keys: dict[tuple[str, str], bool] = {}
        end_of_complete = 0  # byte offset just after the last complete line
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith(b"\n"):
                    tail = _parse_record(line)
                    if tail is None:  # cut mid-record: that image is simply done again
                        os.ftruncate(self._fd, end_of_complete)
                    else:  # cut just before its newline (or an editor dropped it): keep it whole
                        _note(keys, tail["path"], tail["prompt"], tail.get("error"))
                        os.write(self._fd, b"\n")
                    os.fsync(self._fd)
                    break
                end_of_complete += len(line)
                if not line.strip():
                    continue
                record = _parse_record(line)
                if record is None:
                    raise OutputError(f"{self.path} line {number} is not a batch record ({line[:60]!r}); "
                                      "fix or remove that line, or write to another file")
                _note(keys, record["path"], record["prompt"], record.get("error"))
        return keys


def _note(latest: dict[tuple[str, str], bool], path: str, prompt: str, error: object) -> None:
    latest[(path, prompt)] = error is not None  # a later record replaces an earlier one

def _parse_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) \
            or not isinstance(record.get("prompt"), str):
        return None
    return record


def _lock(fd: int, path: Path) -> None:
    """Refuse a second batch on the same file: two writers would describe the same images twice."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks through fcntl; one writer is the user's job
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"another batch is writing to {path}; wait for it or choose another file") from None


def _fsync_folder(folder: Path) -> None:
    """Make a new file's name durable too, not just its contents (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
