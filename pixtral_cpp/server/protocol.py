"""The OpenAI chat-completions protocol's request rules: who may ask, request parsing, errors as HTTP.

No web framework here: a request body (bytes) goes in, our own types come out (messages with decoded
images, GenerationOptions), so every rule about what a client may send is testable without a server.
The response objects are in `responses`.
"""

from __future__ import annotations

import base64
import binascii
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
from pixtral_cpp.errors import ContextLengthError, ConversationError, ImageError, OptionsError, PixtralError
from pixtral_cpp.image_decode import HEAD_BYTES, accepted_family
from pixtral_cpp.images import MAX_IMAGE_SIZE, prepare_image
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.server.config import ServerConfig

MAX_STOP_LENGTH = 256
MAX_STOP_STRINGS = 4  # OpenAI's limit for `stop`
RANDOM_SEED = -1  # llama.cpp's "pick a random seed"
MAX_SEED = 0xFFFFFFFE  # 0xFFFFFFFF is llama.cpp's own "random"
ROLE_NAMES = {"developer": "system"}  # OpenAI's newer name for the system prompt


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
    if isinstance(error, OptionsError):
        return RequestError(400, str(error))
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
    data = json_object(body)
    check_model_name(data, config)
    if typed_field(data, "n", int, 1) != 1:
        raise RequestError(400, "n must be 1: one answer per request", param="n")
    for unsupported in ("tools", "functions"):
        if data.get(unsupported):
            raise RequestError(400, f"{unsupported} are not supported by Pixtral's chat format",
                               param=unsupported)
    stream = typed_field(data, "stream", bool, False)
    stream_options = typed_field(data, "stream_options", dict, None) or {}
    options = generation_options(data, config)  # the cheap checks first: a bad field never waits for the gate
    messages = decode_images(chat_messages(data.get("messages"), config), config, decoding_gate, max_image_size)
    return ChatRequest(messages=messages, options=options, stream=stream,
                       include_usage=bool(stream_options.get("include_usage")))


def check_model_name(data: Mapping[str, Any], config: ServerConfig) -> None:
    """Any name is the one served model unless the server was told to be strict about names."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, f"model must be a string, got {json.dumps(model)[:60]}", param="model")
    if model is not None and not config.serves(model):
        names = ", ".join(repr(name) for name in config.model_names)
        raise RequestError(404, f"the model {model[:100]!r} does not exist; this server serves {names}",
                           code="model_not_found", param="model")


def decode_images(messages: list[Message], config: ServerConfig,
                  decoding_gate: AbstractContextManager[Any] | None, max_image_size: int) -> list[Message]:
    """The messages with their images decoded and prepared, holding `decoding_gate` while they are."""
    if not any(isinstance(part, Image) for message in messages for part in message.parts):
        return messages
    with decoding_gate or contextlib.nullcontext():
        return [_with_decoded_images(number, message, config, max_image_size)
                for number, message in enumerate(messages)]


def json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or 400 saying why not."""
    try:
        data = json.loads(body)
    # ValueError also covers integers past Python's 4300-digit conversion limit
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise RequestError(400, f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {json_type(data)}")
    return data


_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}


def json_type(value: Any) -> str:
    """A value's type as JSON names it: 'an integer', 'an array', ..."""
    return next((name for kind, name in _JSON_TYPES.items() if type(value) is kind), type(value).__name__)


def typed_field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """data[name] if it has the JSON type `kind`; `default` when absent or null; 400 naming the field otherwise."""
    value = data.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python but not a number in JSON
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "a number" if float in kinds else " or ".join(_JSON_TYPES[k] for k in kinds)
        raise RequestError(400, f"{name} must be {names}, got {json.dumps(value)[:60]}", param=name)
    return value


def _number(data: Mapping[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = typed_field(data, name, (int, float), default)
    if not low <= value <= high:  # False for NaN too; no float(): an int past float's range compares fine
        raise RequestError(400, f"{name} must be between {low:g} and {high:g}, got {str(value)[:20]}", param=name)
    return float(value)


def generation_options(data: Mapping[str, Any], config: ServerConfig, *,
                       max_tokens_fields: tuple[str, ...] = ("max_completion_tokens", "max_tokens"),
                       json_schema: dict[str, Any] | None | object = ...) -> GenerationOptions:
    """The request's sampling fields as GenerationOptions. The first of `max_tokens_fields` present sets
    the length; `json_schema` is the schema when the caller read it (otherwise: `response_format`)."""
    name = next((field for field in max_tokens_fields if data.get(field) is not None), max_tokens_fields[-1])
    # No length asked: to the end of the context (the answer stops there), within this server's limit.
    max_tokens = typed_field(data, name, int, config.default_max_tokens or config.max_tokens_limit)
    if not 1 <= max_tokens <= config.max_tokens_limit:
        raise RequestError(400, f"{name} must be between 1 and {config.max_tokens_limit} (this server's "
                           f"limit), got {max_tokens}", param=name)
    defaults = GenerationOptions()
    return GenerationOptions(
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 0.0, 2.0, defaults.temperature),  # OpenAI's range
        top_p=_number(data, "top_p", 0.0, 1.0, defaults.top_p),
        seed=_seed(data),
        stop=_stop(data.get("stop")),
        json_schema=_json_schema(data.get("response_format")) if json_schema is ... else json_schema)


def _seed(data: Mapping[str, Any]) -> int | None:
    seed = typed_field(data, "seed", int, None)
    if seed is None or seed == RANDOM_SEED:
        return None
    if not 0 <= seed <= MAX_SEED:
        raise RequestError(400, f"seed must be between 0 and {MAX_SEED}, or -1 for a random one, got "
                           f"{str(seed)[:20]}", param="seed")
    return seed


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
    if kind == "json_object":  # llama-server's form may carry a schema: {"type": "json_object", "schema": {...}}
        schema: Any = response_format.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise RequestError(400, "response_format.schema must be a JSON schema object", param="response_format")
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
    return checked_schema(schema, "response_format")


def checked_schema(schema: dict[str, Any], param: str) -> dict[str, Any]:
    """`schema` if the grammar converter can express it within its cost limits, else 400 naming `param`."""
    try:
        json_schema_grammar(schema)
    except SamplingError as error:  # a schema the converter cannot express, or one over a cost limit
        raise RequestError(400, str(error), param=param) from None
    return schema


def chat_messages(raw: Any, config: ServerConfig, param: str = "messages") -> list[Message]:
    """OpenAI-style message dicts as Messages, images still undecoded (that waits for the decoding gate)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, f"{param} must be a non-empty array of {{'role', 'content'}} objects",
                           param=param)
    messages = normalize_messages([_openai_message(message) for message in raw],
                                  allow_local_files=config.allowed_image_folder is not None)
    n_images = sum(isinstance(part, Image) for message in messages for part in message.parts)
    if n_images > config.max_images_per_request:
        raise RequestError(400, f"the request holds {n_images} images; this server takes at most "
                           f"{config.max_images_per_request} per request", code="too_many_images",
                           param=param)
    return messages


def _openai_message(message: Any) -> Any:
    """What OpenAI clients send that the library spells otherwise: the developer role, raw base64 images."""
    if not isinstance(message, dict):
        return message  # normalize_messages says what is wrong with it
    role = message.get("role")
    content = message.get("content")
    if isinstance(role, str) and role in ROLE_NAMES:
        message = {**message, "role": ROLE_NAMES[role]}
    if isinstance(content, list):
        message = {**message, "content": [_raw_base64_as_bytes(part) for part in content]}
    return message


def _raw_base64_as_bytes(part: Any) -> Any:
    """An image_url that is bare base64 (no `data:` prefix, as llama.cpp accepts) of an image we decode,
    as the image's bytes; anything else is left for the data-URL, path and URL rules."""
    url = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or url.startswith("data:") or "://" in url or len(url) < 16:
        return part
    try:
        head = base64.b64decode("".join(url[:2 * HEAD_BYTES].split())[:(2 * HEAD_BYTES) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        return part  # not base64: a path
    if accepted_family(head[:HEAD_BYTES]) is None:
        return part
    try:
        data = base64.b64decode("".join(url.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"the image is base64 that does not decode ({error})") from None
    return {"type": "image", "image": data}


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
