"""The OpenAI chat-completions protocol for the server: limits, request parsing, response objects.

No web framework here: a request body (bytes) goes in, our own types come out (messages with decoded
images, GenerationOptions), so every rule about what a client may send is testable without a server.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixtral_cpp.backend import SamplingError, json_schema_grammar
from pixtral_cpp.conversation import Image, Message, normalize_messages
from pixtral_cpp.errors import ContextLengthError, ConversationError, ImageError, PixtralError
from pixtral_cpp.images import MAX_IMAGE_SIZE, check_max_image_size, load_image, prepare_image
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import GenerationStats

MAX_STOP_LENGTH = 256
MAX_SCHEMA_BOUND = 4096  # as many as max_tokens could ever fill
MAX_STOP_STRINGS = 4  # OpenAI's limit for `stop`


@dataclass(frozen=True)
class ServerConfig:
    """What the server accepts: who may call it, which local images it may read, and request limits."""

    api_key: str | None = None  # None: no authentication (loopback only, see server.check_bind_address)
    allowed_image_folder: Path | None = None  # local image paths are refused outside it; None: all refused
    max_body_bytes: int = 20_000_000  # a 20 MB body holds about 15 MB of base64 images
    max_image_pixels: int = 4096 * 4096  # refused before decoding; Pixtral downsizes to 1024 px anyway
    max_tokens_limit: int = 4096  # the most a request may ask for; the context may allow fewer
    default_max_tokens: int = 512  # when the request names no max_tokens
    max_images_per_request: int = 8  # each image costs up to 4160 context positions
    max_queued_requests: int = 16  # waiting or running; more are refused with 503
    model_id: str = "pixtral-12b"
    # Images are brought to the model's budget while parsing, so a queued request holds at most
    # 1024 x 1024 x 3 bytes per image rather than the full upload.
    max_image_size: int = MAX_IMAGE_SIZE

    def __post_init__(self) -> None:
        check_max_image_size(self.max_image_size)
        for name in ("max_body_bytes", "max_image_pixels", "max_tokens_limit", "default_max_tokens",
                     "max_images_per_request", "max_queued_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive integer, got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("ServerConfig.api_key must not be empty; use None for no key")
        if self.api_key is not None:  # a key read from an env file often ends in a newline
            object.__setattr__(self, "api_key", self.api_key.strip())
        if self.allowed_image_folder is not None:
            folder = Path(self.allowed_image_folder).expanduser().resolve()
            if not folder.is_dir():
                raise ValueError(f"allowed_image_folder {folder} is not a folder")
            object.__setattr__(self, "allowed_image_folder", folder)


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
        return RequestError(400, str(error))
    if isinstance(error, PixtralError):
        return RequestError(500, str(error), type="server_error")
    return RequestError(500, "internal error; see the server log", type="server_error")


# ---------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request, images decoded."""

    messages: list[Message]
    options: GenerationOptions
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def parse_chat_request(body: bytes, config: ServerConfig) -> ChatRequest:
    """Validate a /v1/chat/completions body; decodes images, so run it off the event loop."""
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
    return ChatRequest(messages=_messages(data.get("messages"), config), options=_options(data, config),
                       stream=stream, include_usage=bool(stream_options.get("include_usage")))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON ({error})") from None
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
    value = float(_typed(data, name, (int, float), default))
    if not (math.isfinite(value) and low <= value <= high):
        raise RequestError(400, f"{name} must be between {low:g} and {high:g}, got {value:g}", param=name)
    return value


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


_SCHEMA_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def _check_schema_bounds(schema: Any, depth: int = 0) -> None:
    """Refuse length bounds the grammar converter would spell out one repetition at a time: a
    `maxLength` of 10^9 is a tiny request and an 8 GB grammar."""
    if depth > 64:
        raise RequestError(400, "the JSON schema is nested too deeply", param="response_format")
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in _SCHEMA_BOUNDS and isinstance(value, int) and value > MAX_SCHEMA_BOUND:
                raise RequestError(400, f"JSON schema {key} {value} is over the limit of {MAX_SCHEMA_BOUND}",
                                   param="response_format")
            _check_schema_bounds(value, depth + 1)
    elif isinstance(schema, list):
        for item in schema:
            _check_schema_bounds(item, depth + 1)


def _json_schema(response_format: Any) -> dict[str, Any] | None:
    """The schema the answer must follow, checked now so a bad one never waits in the queue."""
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
    _check_schema_bounds(schema)
    try:
        json_schema_grammar(schema)
    except SamplingError as error:
        # well-formed JSON, but a schema the grammar converter cannot express: unprocessable, not malformed
        raise RequestError(422, str(error), param="response_format") from None
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
    return [_with_decoded_images(number, message, config) for number, message in enumerate(messages)]


def _with_decoded_images(number: int, message: Message, config: ServerConfig) -> Message:
    """Images decoded here, outside the model lock, and refused over the pixel limit before decoding."""
    parts = []
    for index, part in enumerate(message.parts):
        if isinstance(part, Image):
            where = f"message {number}: part {index}"
            source = _allowed_source(where, part.source, config)
            try:
                # Prepared here as the model would (EXIF, alpha, budget, grid of 16): the model finds the
                # array already at its grid size and uses it unchanged.
                loaded = load_image(source, max_pixels=config.max_image_pixels)
                part = Image(prepare_image(loaded, max_image_size=config.max_image_size).pixels)
            except ImageError as error:
                raise ImageError(f"{where}: {error}") from None
        parts.append(part)
    return Message(message.role, tuple(parts))


def _allowed_source(where: str, source: Any, config: ServerConfig) -> Any:
    if not isinstance(source, Path):
        return source  # bytes from a data URL
    folder = config.allowed_image_folder
    resolved = source.expanduser().resolve()  # symlinks followed: a link may not lead out of the folder
    if folder is None or not resolved.is_relative_to(folder):
        raise ImageError(f"{where}: local image {str(source)[:80]!r} is outside the folder this server may "
                         "read; send the image as a data: URL")
    return resolved


# ---------------------------------------------------------------------------------------------------
# Responses


def finish_reason(stats: GenerationStats) -> str:
    """OpenAI's name: a stop string ends an answer like the end token does."""
    return "length" if stats.finish_reason == "length" else "stop"


def usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


@dataclass(frozen=True)
class ResponseHeader:
    """What every object of one response shares."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> ResponseHeader:
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)

    def completion(self, text: str, stats: GenerationStats) -> dict[str, Any]:
        """A chat.completion object."""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason(stats)}],
                "usage": usage(stats)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
        """A chat.completion.chunk object; with usage_counts, the usage-only last chunk (no choices)."""
        choices = [] if usage_counts else [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices}
        if usage_counts:
            chunk["usage"] = usage_counts
        return chunk


def model_object(config: ServerConfig, created: int) -> dict[str, Any]:
    return {"id": config.model_id, "object": "model", "created": created, "owned_by": "pixtral-cpp"}


def sse_event(data: Mapping[str, Any] | Sequence[Any] | str) -> bytes:
    """One server-sent event; OpenAI's stream is `data: <json>` events and a final `data: [DONE]`."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
