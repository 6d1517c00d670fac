"""The folders pixtral-cpp keeps files in: models (`convert` writes there and the runtime looks there), the
prompt cache and corrected copies of others' mmproj files."""

from __future__ import annotations

import os
from pathlib import Path

from pixtral_cpp.defaults import DISK_CACHE_ENV

MODELS_ENV = "PIXTRAL_CPP_MODELS"
CORRECTED_DIR_ENV = "PIXTRAL_CPP_CORRECTED_DIR"  # corrected copies of others' mmproj files (fix_pair)


def default_models_dir() -> Path:
    """$PIXTRAL_CPP_MODELS, else $XDG_DATA_HOME/pixtral-cpp/models, else ~/.local/share/pixtral-cpp/models."""
    explicit = os.environ.get(MODELS_ENV)
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "pixtral-cpp" / "models"


def default_prompt_cache_dir() -> Path:
    """$PIXTRAL_CPP_CACHE_DIR, else $XDG_CACHE_HOME/pixtral-cpp/prompts, else ~/.cache/pixtral-cpp/prompts."""
    return _cache_folder(DISK_CACHE_ENV, "prompts")


def corrected_dir() -> Path:
    """$PIXTRAL_CPP_CORRECTED_DIR, else $XDG_CACHE_HOME/pixtral-cpp/corrected, else ~/.cache/pixtral-cpp/corrected."""
    return _cache_folder(CORRECTED_DIR_ENV, "corrected")


def _cache_folder(env: str, name: str) -> Path:
    explicit = os.environ.get(env)
    if explicit:
        return Path(explicit).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "pixtral-cpp" / name
