"""The JSON files of a checkpoint, read defensively: bounded size, no repeated keys, one-line errors.

A checkpoint is data from the internet. Whatever its JSON holds (megabytes of nesting, a number with
100,000 digits, invalid UTF-8, a FIFO where a file should be), the reader answers with the caller's
domain error naming the file, never with a traceback or an unbounded read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from pixtral_cpp.errors import CheckpointError

# params.json, config.json and the shard index are kilobytes; anything this large is not one of them.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Pixtral's tekken.json is 15 MB and tokenizer.json 9 MB; the largest published vocabularies stay under 50 MB.
MAX_TOKENIZER_BYTES = 512 * 1024 * 1024


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; in a config or a header that hides a contradiction.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _RepeatedKey(key)
        result[key] = value
    return result


def brief(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, so that an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def parse_json(raw: bytes, where: str, error: type[CheckpointError], *, unique_keys: bool = True) -> Any:
    """Decode UTF-8 JSON; every failure becomes `error` with a message that starts with `where`."""
    hook = _object_without_repeats if unique_keys else None
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
    except _RepeatedKey as exc:
        raise error(f"{where}: key {brief(exc.key)} appears twice in one JSON object") from None
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to be a checkpoint file") from None
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python's 4300-digit limit
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{where}: not valid JSON ({brief(first_line, 120)[1:-1]})") from None


def read_json_object(path: Path, error: type[CheckpointError], *, max_bytes: int = MAX_CONFIG_BYTES,
                     unique_keys: bool = True) -> dict[str, Any]:
    """A JSON object from a regular file of at most `max_bytes` bytes."""
    try:
        info = os.stat(path)  # before open(): opening a FIFO would block
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise error(f"{path}: {info.st_size} bytes is too large for this file "
                        f"(at most {max_bytes}); is it the right file?")
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:  # grew while we read it
        raise error(f"{path}: larger than {max_bytes} bytes; is it the right file?")
    data = parse_json(raw, str(path), error, unique_keys=unique_keys)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
