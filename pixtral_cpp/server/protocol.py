"""The OpenAI chat-completions protocol's request rules: who may ask, request parsing, errors as HTTP.

No web framework here: a request body (bytes) goes in, our own types come out (messages with decoded
images, GenerationOptions), so every rule about what a client may send is testable without a server.
The response objects are in `responses`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixtral_cpp.backend import GrammarError, SamplingError, json_schema_grammar
from pixtral_cpp.conversation import Image, Message, normalize_messages
from pixtral_cpp.errors import ContextLengthError, ConversationError, ImageError, PixtralError
from pixtral_cpp.images import MAX_IMAGE_SIZE, prepare_image
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.server.config import ServerConfig

MAX_STOP_LENGTH = 256
MAX_STOP_STRINGS = 4  # OpenAI's limit for `stop`


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        """{"error": {...}} as OpenAI writes it."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def request_error_from(error: Exception) -> RequestError:
    """The HTTP answer to a library error raised while preparing or generating."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, ContextLengthError):
        return RequestError(400, str(error), code="context_length_exceeded", param="messages")
    if isinstance(error, ImageError):
        return RequestError(400, str(error), code="invalid_image", param="messages")
    if isinstance(error, ConversationError):
        return RequestError(400, str(error), param="messages")
    if isinstance(error, SamplingError):
        return RequestError(400, str(error), param="response_format" if isinstance(error, GrammarError) else None)
    if isinstance(error, PixtralError):
        return RequestError(500, str(error), type="server_error")
    return RequestError(500, "internal error; see the server log", type="server_error")


# ---------------------------------------------------------------------------------------------------
# Who may ask: the Host and Content-Type headers


def is_loopback_name(name: str) -> bool:
    """True for localhost, *.localhost (RFC 6761: never resolved beyond this machine), 127.0.0.0/8 and
    [::1]; any other name may resolve anywhere, or be re-pointed by whoever owns it."""
    word = name.lower().removesuffix(".")
    if word == "localhost" or word.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), or None if malformed."""
    if header.startswith("["):
        inside, bracket, port = header[1:].partition("]")
        name = f"[{inside}]"
        if not bracket or (port and not (port.startswith(":") and port[1:].isdigit())):
            return None
    else:
        name, colon, port = header.partition(":")
        if colon and not port.isdigit():
            return None
    return name.lower() or None


def check_host(header: bytes | None, *, loopback_only: bool, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Refuse a Host this server does not answer to: a page in a browser can make a name of its own
    point at 127.0.0.1 (DNS rebinding) and would then read the answers, but it cannot change the Host."""
    if not loopback_only and not allowed_hosts:
        return
    text = header.decode("latin-1") if header is not None else None
    name = _host_name(text) if text else None
    if name is not None and (name in allowed_hosts or (loopback_only and is_loopback_name(name))):
        return
    shown = "no Host header" if text is None else f"the Host header {text[:100]!r}"
    names = ", ".join((["localhost, *.localhost, 127.0.0.0/8, [::1]"] if loopback_only else []) + list(allowed_hosts))
    raise RequestError(421, f"{shown} is not a name this server answers to ({names}): a web page may be trying "
                       "to reach it through DNS rebinding; pass --allowed-host NAME if that name is yours",
                       code="invalid_host")


def check_json_content_type(header: str | None) -> None:
    """Refuse a body that is not declared JSON: a web page can send text/plain to any address without
    asking (a CORS simple request), but not application/json."""
    media_type = (header or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = "no Content-Type" if header is None else f"Content-Type {header[:100]!r}"
        raise RequestError(415, f"the request body must be sent as Content-Type: application/json, not "
                           f"{shown}", code="unsupported_media_type")


# ---------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request, images decoded."""

    messages: list[Message]
    options: GenerationOptions
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def parse_chat_request(body: bytes, config: ServerConfig,
                       decoding_gate: AbstractContextManager[Any] | None = None, *,
                       max_image_size: int = MAX_IMAGE_SIZE) -> ChatRequest:
    """Validate a /v1/chat/completions body; decodes images, so run it off the event loop.

    `decoding_gate` (e.g. a threading.Semaphore) is held while this request decodes its images, so that
    the server bounds how many full-size uploads are in memory at once. Images are brought to
    `max_image_size` (the model's budget) here, so a queued request holds at most 1024 x 1024 x 3 bytes
    per image rather than the full upload.
    """
    data = _json_object(body)
    model = data.get("model")
    if model is not None and model != config.model_id:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {config.model_id!r}",
                           code="model_not_found", param="model")
    if data.get("n", 1) != 1:
        raise RequestError(400, "n must be 1: one answer per request", param="n")
    for unsupported in ("tools", "functions"):
        if data.get(unsupported):
            raise RequestError(400, f"{unsupported} are not supported by Pixtral's chat format",
                               param=unsupported)
    stream = _typed(data, "stream", bool, False)
    stream_options = _typed(data, "stream_options", dict, None) or {}
    options = _options(data, config)  # the cheap checks first: a bad field never waits for the gate
    messages = _messages(data.get("messages"), config)
    if any(isinstance(part, Image) for message in messages for part in message.parts):
        with decoding_gate or contextlib.nullcontext():
            messages = [_with_decoded_images(number, message, config, max_image_size)
                        for number, message in enumerate(messages)]
    return ChatRequest(messages=messages, options=options, stream=stream,
                       include_usage=bool(stream_options.get("include_usage")))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    # ValueError also covers integers past Python's 4300-digit conversion limit
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise RequestError(400, f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def _typed(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(name)
    if value is None:
        return default
    # bool is an int in Python but not a number in JSON
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(400, f"{name} must be {names}, got {json.dumps(value)[:60]}", param=name)
    return value


def _number(data: Mapping[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = _typed(data, name, (int, float), default)
    if not low <= value <= high:  # False for NaN too; no float(): an int past float's range compares fine
        raise RequestError(400, f"{name} must be between {low:g} and {high:g}, got {str(value)[:20]}", param=name)
    return float(value)


def _options(data: Mapping[str, Any], config: ServerConfig) -> GenerationOptions:
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(data, name, int, min(config.default_max_tokens, config.max_tokens_limit))
    if not 1 <= max_tokens <= config.max_tokens_limit:
        raise RequestError(400, f"{name} must be between 1 and {config.max_tokens_limit} (this server's "
                           f"limit), got {max_tokens}", param=name)
    defaults = GenerationOptions()
    return GenerationOptions(
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 0.0, 2.0, defaults.temperature),  # OpenAI's range
        top_p=_number(data, "top_p", 0.0, 1.0, defaults.top_p),
        seed=_typed(data, "seed", int, None),
        stop=_stop(data.get("stop")),
        json_schema=_json_schema(data.get("response_format")))


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise RequestError(400, f"stop strings may be at most {MAX_STOP_LENGTH} characters long", param="stop")
    return tuple(stops)


def _json_schema(response_format: Any) -> dict[str, Any] | None:
    """The schema the answer must follow, checked now so a bad one never waits in the queue (the
    converter also refuses schemas over its cost limits: bounds, size, rules, alternatives)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError(400, "response_format.json_schema.schema must be a JSON schema object",
                               param="response_format")
    else:
        raise RequestError(400, "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
                           "{'type': 'json_schema', 'json_schema': {'schema': {...}}}",
                           param="response_format")
    try:
        json_schema_grammar(schema)
    except SamplingError as error:  # a schema the converter cannot express, or one over a cost limit
        raise RequestError(400, str(error), param="response_format") from None
    return schema


def _messages(raw: Any, config: ServerConfig) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "messages must be a non-empty list of {'role', 'content'} objects",
                           param="messages")
    messages = normalize_messages(raw, allow_local_files=config.allowed_image_folder is not None)
    n_images = sum(isinstance(part, Image) for message in messages for part in message.parts)
    if n_images > config.max_images_per_request:
        raise RequestError(400, f"the request holds {n_images} images; this server takes at most "
                           f"{config.max_images_per_request} per request", code="too_many_images",
                           param="messages")
    return messages  # images still undecoded: that waits for the decoding gate


def _with_decoded_images(number: int, message: Message, config: ServerConfig, max_image_size: int) -> Message:
    """Images decoded here, outside the model lock, and refused over the pixel limit before decoding."""
    parts = []
    for index, part in enumerate(message.parts):
        if isinstance(part, Image):
            where = f"message {number}: part {index}"
            source = _allowed_source(where, part.source, config)
            try:
                # Prepared here as the model would (EXIF, alpha, budget, grid of 16): the model finds the
                # array already at its grid size and uses it unchanged.
                # JPEGs are reduced while decoding: a 24 MP photo never exists in memory at full size.
                part = Image(prepare_image(source, max_image_size=max_image_size,
                                           max_pixels=config.max_image_pixels, reduce_while_decoding=True).pixels)
            except ImageError as error:
                raise ImageError(f"{where}: {error}") from None
        parts.append(part)
    return Message(message.role, tuple(parts))


def _allowed_source(where: str, source: Any, config: ServerConfig) -> Any:
    if not isinstance(source, Path):
        return source  # bytes from a data URL
    folder = config.allowed_image_folder
    try:
        resolved = source.expanduser().resolve()  # symlinks followed: a link may not lead out of the folder
    except (OSError, RuntimeError, ValueError) as error:  # a NUL byte, a symlink loop, a bad ~user
        raise ImageError(f"{where}: local image path {str(source)[:80]!r} cannot be resolved ({error})") from None
    if folder is None or not resolved.is_relative_to(folder):
        raise ImageError(f"{where}: local image {str(source)[:80]!r} is outside the folder this server may "
                         "read; send the image as a data: URL")
    return resolved
