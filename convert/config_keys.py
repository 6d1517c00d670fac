"""Typed access to a config file's JSON object: every error names the file and the key."""

from __future__ import annotations

from typing import Any

from pixtral_cpp.convert.json_files import brief
from pixtral_cpp.errors import ConfigError

_MISSING = object()


class ConfigKeys:
    """Typed access to one JSON object, every error naming the file and the key."""

    def __init__(self, data: dict[str, Any], where: str, defaults: dict[str, Any] | None = None) -> None:
        self.data, self.where, self.defaults = data, where, defaults or {}

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if self.defaults.get(key) is not None:
            return self.defaults[key]
        if default is not _MISSING:
            return default
        raise ConfigError(f"{self.where}: required key '{key}' is missing")

    def int(self, key: str, default: Any = None) -> int:
        value = self._get(key, _MISSING if default is None else default)
        # 32.0, "32", true and 1e999 (inf) are all refused: a float where a count belongs is corruption.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}: key '{key}' must be an integer, got {brief(value)}")
        return value

    def float(self, key: str, default: Any = None) -> float:
        value = self._get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.where}: key '{key}' must be a number, got {brief(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer with hundreds of digits
            raise ConfigError(f"{self.where}: key '{key}' is too large, got {brief(value)}") from None

    def str(self, key: str, default: Any = None) -> str:
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.where}: key '{key}' must be a string, got {brief(value)}")
        return value

    def bool(self, key: str, default: Any = None) -> bool:
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: key '{key}' must be true or false, got {brief(value)}")
        return value

    def optional_int(self, key: str) -> int | None:
        return self.int(key) if self.data.get(key) is not None else None

    def section(self, key: str, defaults: dict[str, Any] | None = None) -> ConfigKeys:
        value = self.data.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where}: key '{key}' must be an object, got {type(value).__name__}")
        return ConfigKeys(value, f"{self.where} [{key}]", defaults)


