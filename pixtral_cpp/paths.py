"""Where models live by default: `convert` writes there and the runtime looks there."""

from __future__ import annotations

import os
from pathlib import Path

MODELS_ENV = "PIXTRAL_CPP_MODELS"


def default_models_dir() -> Path:
    """$PIXTRAL_CPP_MODELS, else $XDG_DATA_HOME/pixtral-cpp/models, else ~/.local/share/pixtral-cpp/models."""
    explicit = os.environ.get(MODELS_ENV)
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "pixtral-cpp" / "models"
