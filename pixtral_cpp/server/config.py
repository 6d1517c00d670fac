"""What the server accepts and where it may listen: ServerConfig and the bind-address rule.

Light on purpose (no web framework, no model): the CLI reads its defaults from these fields.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

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
    # When a request names no max_tokens: None answers to the end of the context (as OpenAI and llama-server
    # do), stopping at max_tokens_limit at most.
    default_max_tokens: int | None = None
    max_images_per_request: int = 8  # each image costs up to 4160 context positions
    max_queued_requests: int = 16  # waiting or running; more are refused with 503
    model_id: str = "pixtral-12b"
    model_aliases: tuple[str, ...] = ()  # other names clients may use for the model
    # False: any `model` a request names is this one model (clients often send "gpt-4o" or their own
    # default); True: only model_id and the aliases, anything else is 404.
    strict_model_name: bool = False
    # Requests decoding images at once: a full-size decode holds the whole upload's pixels.
    max_concurrent_decodes: int = 1
    # Extra names accepted in the Host header. A loopback server takes only loopback names besides these
    # (DNS rebinding); a server on another address takes any Host unless this names some.
    allowed_hosts: tuple[str, ...] = ()
    # Web origins (scheme://host[:port]) whose pages may call the server from a browser (CORS); none: no page may.
    cors_origins: tuple[str, ...] = ()
    # Responses API answers kept in memory for previous_response_id (oldest dropped first), and the image
    # bytes they may hold in all (each image is kept prepared, at most 1024 x 1024 x 3 bytes).
    max_stored_responses: int = 64
    max_stored_image_bytes: int = 256_000_000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_tokens_limit", "default_max_tokens",
                     "max_images_per_request", "max_queued_requests", "max_concurrent_decodes",
                     "max_stored_responses", "max_stored_image_bytes"):
            value = getattr(self, name)
            if value is None and name == "default_max_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerConfigError(f"ServerConfig.{name} must be a positive integer, got {value!r}")
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ServerConfigError(f"the default max_tokens ({self.default_max_tokens}) is over the limit a "
                                    f"request may ask for ({self.max_tokens_limit}); raise --max-tokens-limit")
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
        if not self.model_id or not all(isinstance(name, str) and name for name in self.model_aliases):
            raise ServerConfigError("model names must be non-empty strings")
        object.__setattr__(self, "cors_origins", tuple(_origin(origin) for origin in self.cors_origins))
        if self.api_key is not None:  # a key read from an env file often ends in a newline
            object.__setattr__(self, "api_key", _sendable_key(self.api_key))
        object.__setattr__(self, "allowed_hosts", tuple(host.lower() for host in self.allowed_hosts))
        if self.allowed_image_folder is not None:
            folder = Path(self.allowed_image_folder).expanduser().resolve()
            if not folder.is_dir():
                raise ServerConfigError(f"allowed_image_folder {folder} is not a folder")
            object.__setattr__(self, "allowed_image_folder", folder)


    @property
    def model_names(self) -> tuple[str, ...]:
        """The names this server answers to under strict_model_name: the id, then the aliases."""
        return tuple(dict.fromkeys((self.model_id, *self.model_aliases)))

    def serves(self, name: str) -> bool:
        """Whether a request naming `name` as its model is answered (the one served model)."""
        return not self.strict_model_name or name in self.model_names


def _origin(origin: str) -> str:
    """A CORS origin as browsers send it (no path, no trailing slash), or "*" for any page."""
    text = origin.strip().rstrip("/")
    scheme, sep, rest = text.partition("://")
    if text != "*" and (not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest):
        raise ServerConfigError(f"a CORS origin is scheme://host[:port] as a browser sends it (e.g. "
                                f"http://localhost:3000) or *, got {origin!r}")
    return text if text == "*" else f"{scheme.lower()}://{rest.lower()}"


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
