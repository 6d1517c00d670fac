"""Puts the tokenizer files of a synthetic checkpoint in place and reports the vocabulary size."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pixtral_cpp.errors import ConfigError, TokenizerError

# "real": mistral_common's tekken_240911.json (131072 tokens); "small": a reduced tekken written by
# tekken.write_small_tekken; a Path: that tekken.json.
TokenizerChoice = Literal["real", "small"] | Path

TOKENIZER_FILES = ("tekken.json", "tokenizer.json")


def _materialise_tekken(choice: TokenizerChoice, scratch: Path) -> Path:
    if isinstance(choice, Path):
        if not choice.is_file():
            raise TokenizerError(f"tekken file {choice} does not exist")
        return choice
    if choice == "real":
        from pixtral_cpp.synthetic.tekken import real_tekken_path

        return real_tekken_path()
    if choice == "small":
        from pixtral_cpp.synthetic.tekken import write_small_tekken

        path = scratch / "tekken.json"
        write_small_tekken(path)
        return path
    raise ConfigError(f"tokenizer must be 'real', 'small' or a Path to a tekken.json, got {choice!r}")


def tekken_vocab_size(path: Path) -> int:
    """Rows of the embedding matrix a model with this tekken file needs (specials included)."""
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["config"]["default_vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TokenizerError(f"{path} is not a readable tekken file: {error}") from error


def install_tokenizer(out_dir: Path, choice: TokenizerChoice, file_names: tuple[str, ...]) -> int:
    """Write the requested tokenizer files into `out_dir`; return the vocabulary size."""
    unknown = sorted(set(file_names) - set(TOKENIZER_FILES))
    if unknown or not file_names:
        raise ConfigError(
            f"tokenizer files must be a non-empty subset of {TOKENIZER_FILES}, got {file_names}")
    with tempfile.TemporaryDirectory() as scratch:
        tekken = _materialise_tekken(choice, Path(scratch))
        if "tekken.json" in file_names:
            shutil.copyfile(tekken, out_dir / "tekken.json")
        if "tokenizer.json" in file_names:
            from pixtral_cpp.synthetic.tekken import write_tokenizer_json

            write_tokenizer_json(tekken, out_dir / "tokenizer.json")
        return tekken_vocab_size(tekken)
