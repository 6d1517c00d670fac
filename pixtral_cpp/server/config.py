"""What the server accepts and where it may listen: ServerConfig and the bind-address rule.

Light on purpose (no web framework, no model): the CLI reads its defaults from these fields.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pixtral_cpp.defaults import DEFAULT_MAX_TOKENS
from pixtral_cpp.errors import ServerConfigError, UnsafeBindError


@dataclass(frozen=True)
class ServerConfig:
    """What the server accepts: who may call it, which local images it may read, and request limits.

    The image budget (longest edge) is the model's own, `PixtralModel.options.max_image_size`.
    """

    api_key: str | None = None  # None: no authentication (loopback only, see check_bind_address)
    allowed_image_folder: Path | None = None  # local image paths are refused outside it; None: all refused
    max_body_bytes: int = 20_000_000  # a 20 MB body holds about 15 MB of base64 images
    max_image_pixels: int = 4096 * 4096  # refused before decoding; Pixtral downsizes to 1024 px anyway
    max_tokens_limit: int = 4096  # the most a request may ask for; the context may allow fewer
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # when the request names no max_tokens
    max_images_per_request: int = 8  # each image costs up to 4160 context positions
    max_queued_requests: int = 16  # waiting or running; more are refused with 503
    model_id: str = "pixtral-12b"
    # Requests decoding images at once: a full-size decode holds the whole upload's pixels.
    max_concurrent_decodes: int = 1
    # Extra names accepted in the Host header. A loopback server takes only loopback names besides these
    # (DNS rebinding); a server on another address takes any Host unless this names some.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_tokens_limit", "default_max_tokens",
                     "max_images_per_request", "max_queued_requests", "max_concurrent_decodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerConfigError(f"ServerConfig.{name} must be a positive integer, got {value!r}")
        if self.api_key is not None:  # a key read from an env file often ends in a newline
            object.__setattr__(self, "api_key", _sendable_key(self.api_key))
        object.__setattr__(self, "allowed_hosts", tuple(host.lower() for host in self.allowed_hosts))
        if self.allowed_image_folder is not None:
            folder = Path(self.allowed_image_folder).expanduser().resolve()
            if not folder.is_dir():
                raise ServerConfigError(f"allowed_image_folder {folder} is not a folder")
            object.__setattr__(self, "allowed_image_folder", folder)


def _sendable_key(key: str) -> str:
    """The key as clients send it (compared as UTF-8 bytes), or an error for one no client can send."""
    key = key.strip(" \t\r\n")  # what HTTP strips around a header value, and an env file's newline
    if not key:
        raise ServerConfigError("the API key must not be empty; use None for no key")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in key):
        raise ServerConfigError("the API key holds a control character, which no HTTP header can carry; "
                                "choose a key of printable characters")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 in argv or the environment
        raise ServerConfigError("the API key is not valid UTF-8; choose a key of printable characters") from None
    return key


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other name may resolve to a public interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, config: ServerConfig, *, allow_remote: bool = False) -> None:
    """Refuse a non-loopback address unless requests need a key, or the operator says it is fine."""
    if is_loopback(host) or config.api_key is not None or allow_remote:
        return
    raise UnsafeBindError(
        f"refusing to listen on {host} without an API key: anyone who can reach it could use the model. "
        "Set --api-key (or PIXTRAL_CPP_API_KEY), or pass --allow-remote if something in front of the "
        "server (a reverse proxy) already checks who may call it")
