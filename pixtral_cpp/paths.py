"""Where models live by default: `convert` writes there and the runtime looks there."""

from __future__ import annotations

import os
from pathlib import Path

from pixtral_cpp.defaults import DISK_CACHE_ENV

MODELS_ENV = "PIXTRAL_CPP_MODELS"


def default_models_dir() -> Path:
    """$PIXTRAL_CPP_MODELS, else $XDG_DATA_HOME/pixtral-cpp/models, else ~/.local/share/pixtral-cpp/models."""
    explicit = os.environ.get(MODELS_ENV)
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "pixtral-cpp" / "models"


def default_prompt_cache_dir() -> Path:
    """$PIXTRAL_CPP_CACHE_DIR, else $XDG_CACHE_HOME/pixtral-cpp/prompts, else ~/.cache/pixtral-cpp/prompts."""
    explicit = os.environ.get(DISK_CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "pixtral-cpp" / "prompts"
