"""OpenAI's Responses API (/v1/responses) for what Pixtral does: text and image input, instructions,
structured output (`text.format`), streaming events, usage, and follow-ups by `previous_response_id`.

A request becomes the same messages and GenerationOptions a chat request does and runs on the same
worker; only the shapes differ. Answers with `store` (the default, as OpenAI's) are kept in memory,
a bounded number and image bytes, oldest dropped first, so that a follow-up can name one; a name that is
not (or no longer) kept is a 400 saying so. Tools, background runs and server-side conversations are
refused with a 400 naming the field.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pixtral_cpp.conversation import Image, Message
from pixtral_cpp.images import MAX_IMAGE_SIZE
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import GenerationStats
from pixtral_cpp.server.config import ServerConfig
from pixtral_cpp.server.protocol import (
    RequestError,
    chat_messages,
    check_model_name,
    checked_schema,
    decode_images,
    generation_options,
    json_object,
    json_type,
    typed_field,
)
from pixtral_cpp.server.responses import usage

# Request fields for things Pixtral or this server does not do; a null, false or empty value is fine.
_REFUSED = {"tools": "tools are not supported by Pixtral's chat format",
            "background": "background responses are not supported: send the request and wait, or stream it",
            "conversation": "server-side conversations are not supported: use previous_response_id",
            "prompt": "stored prompt templates are not supported: send the input itself"}
_ROLES = ("user", "assistant", "system", "developer")
_FAILED_CODES = ("server_error", "rate_limit_exceeded", "invalid_prompt", "invalid_image")  # of OpenAI's


@dataclass(frozen=True)
class ResponsesRequest:
    """A validated /v1/responses request, images decoded."""

    messages: list[Message]  # what the model answers: instructions, the earlier turns, this input
    turns: list[Message]  # what a follow-up carries on from: the earlier turns and this input (no instructions)
    options: GenerationOptions
    stream: bool
    store: bool
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats


def parse_responses_request(body: bytes, config: ServerConfig, store: ResponseStore,
                            decoding_gate: AbstractContextManager[Any] | None = None, *,
                            max_image_size: int = MAX_IMAGE_SIZE) -> ResponsesRequest:
    """Validate a /v1/responses body; decodes images, so run it off the event loop."""
    data = json_object(body)
    check_model_name(data, config)
    for name, why in _REFUSED.items():
        if data.get(name):
            raise RequestError(400, why, param=name)
    instructions = typed_field(data, "instructions", str, None)
    schema, text_config = _text_format(data.get("text"))
    options = generation_options(data, config, max_tokens_fields=("max_output_tokens",), json_schema=schema)
    earlier = store.turns(typed_field(data, "previous_response_id", str, None))
    new = decode_images(chat_messages(_input_messages(data.get("input")), config, param="input"), config,
                        decoding_gate, max_image_size)
    turns = [*earlier, *new]
    system = [Message.system(instructions)] if instructions else []
    echo = {"instructions": instructions, "max_output_tokens": data.get("max_output_tokens"),
            "previous_response_id": data.get("previous_response_id"), "temperature": options.temperature,
            "top_p": options.top_p, "text": text_config,
            "metadata": typed_field(data, "metadata", dict, {}), "user": typed_field(data, "user", str, None)}
    return ResponsesRequest(messages=[*system, *turns], turns=turns, options=options,
                            stream=typed_field(data, "stream", bool, False),
                            store=typed_field(data, "store", bool, True), echo=echo)


def _text_format(text: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The schema `text.format` asks for, and the text config the response repeats."""
    if text is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(text, dict):
        raise RequestError(400, f"text must be an object, got {json_type(text)}", param="text")
    spec = text.get("format") or {"type": "text"}
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None, {**text, "format": {"type": "text"}}
    if kind == "json_object":
        return checked_schema({"type": "object"}, "text.format"), {**text, "format": spec}
    if kind == "json_schema" and isinstance(spec.get("schema"), dict):
        return checked_schema(spec["schema"], "text.format"), {**text, "format": spec}
    raise RequestError(400, "text.format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                       "'json_schema', 'name': ..., 'schema': {...}}", param="text.format")


def _input_messages(raw: Any) -> list[dict[str, Any]]:
    """Responses input (a string, or message items with input_text / input_image parts) as chat messages."""
    if isinstance(raw, str) and raw:
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "input must be a non-empty string or an array of message items", param="input")
    return [_input_message(number, item) for number, item in enumerate(raw)]


def _input_message(number: int, item: Any) -> dict[str, Any]:
    where = f"input item {number}"
    if not isinstance(item, dict):
        raise RequestError(400, f"{where} must be an object with 'role' and 'content', got {json_type(item)}",
                           param="input")
    kind = item.get("type", "message")
    if kind != "message":
        raise RequestError(400, f"{where} is of type {str(kind)[:40]!r}: only message items are supported "
                           "(no tools, no item references)", param="input")
    role = item.get("role")
    if role not in _ROLES:
        raise RequestError(400, f"{where}: role must be one of {', '.join(_ROLES)}, got {json.dumps(role)[:40]}",
                           param="input")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise RequestError(400, f"{where}: content must be a string or an array of parts", param="input")
    return {"role": role, "content": [_input_part(f"{where}, part {index}", part)
                                      for index, part in enumerate(content)]}


def _input_part(where: str, part: Any) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}  # output_text: an earlier answer sent back as input
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise RequestError(400, f"{where}: file_id images are not supported (this server keeps no files); "
                               "send the image as a data: URL in image_url", param="input")
        if isinstance(part.get("image_url"), str):
            return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    raise RequestError(400, f"{where}: expected {{'type': 'input_text', 'text': str}} or {{'type': "
                       "'input_image', 'image_url': 'data:...'}", param="input")


# ---------------------------------------------------------------------------------------------------
# Kept answers, for previous_response_id


@dataclass(frozen=True)
class _Kept:
    turns: list[Message]  # the input turns and the answer
    response: dict[str, Any]
    image_bytes: int


class ResponseStore:
    """Answers kept in memory: at most `max_responses` and `max_image_bytes` of images, oldest dropped first."""

    def __init__(self, max_responses: int, max_image_bytes: int) -> None:
        self.max_responses, self.max_image_bytes = max_responses, max_image_bytes
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()  # parsing runs in a thread pool, storing on the event loop

    def turns(self, response_id: str | None) -> list[Message]:
        """The conversation up to and including the answer `response_id`; 400 when it is not kept."""
        if response_id is None:
            return []
        with self._lock:
            kept = self._kept.get(response_id)
            if kept is not None:
                self._kept.move_to_end(response_id)
        if kept is None:
            raise RequestError(400, f"previous response {response_id[:80]!r} is not kept by this server (it was "
                               "never stored, or older answers were dropped; this server keeps the last "
                               f"{self.max_responses} in memory, until it restarts)",
                               code="previous_response_not_found", param="previous_response_id")
        return kept.turns

    def response(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            kept = self._kept.get(response_id)
        return kept.response if kept else None

    def keep(self, response_id: str, turns: list[Message], response: dict[str, Any]) -> None:
        size = sum(part.source.nbytes for message in turns for part in message.parts
                   if isinstance(part, Image) and isinstance(part.source, np.ndarray))
        if size > self.max_image_bytes:
            return  # it would push out everything else
        with self._lock:
            self._kept[response_id] = _Kept(turns, response, size)
            while len(self._kept) > self.max_responses or self._image_bytes() > self.max_image_bytes:
                self._kept.popitem(last=False)

    def _image_bytes(self) -> int:
        return sum(kept.image_bytes for kept in self._kept.values())


# ---------------------------------------------------------------------------------------------------
# Answers


def response_usage(stats: GenerationStats) -> dict[str, Any]:
    """The Responses API's names for the chat usage counts."""
    counts = usage(stats)
    cached = counts.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"input_tokens": counts["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": counts["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts["total_tokens"]}


class ResponsesFormat:
    """Response objects, or the Responses API's event stream, for one request; keeps the answer if asked."""

    def __init__(self, request: ResponsesRequest, model: str, store: ResponseStore) -> None:
        self.request, self.model, self.store = request, model, store
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def _response(self, status: str, output: list[dict[str, Any]], stats: GenerationStats | None = None,
                  error: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = stats is not None and stats.finish_reason == "length"
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": "incomplete" if incomplete else status, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "model": self.model, "output": output, "parallel_tool_calls": False, "tool_choice": "none",
                "tools": [], "truncation": "disabled", "store": self.request.store, **self.request.echo,
                "usage": response_usage(stats) if stats is not None else None}

    def _message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self._text_part(text)]
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def _text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def completion(self, text: str, stats: GenerationStats) -> dict[str, Any]:
        status = "incomplete" if stats.finish_reason == "length" else "completed"
        response = self._response("completed", [self._message(text, status)], stats)
        if self.request.store:
            self.store.keep(self.id, [*self.request.turns, Message.assistant(text)], response)
        return response

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        # `event:` lines as OpenAI sends them; ASCII JSON: a message may quote a client's lone surrogate
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[bytes]:
        started = self._response("in_progress", [])
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started),
                self._event("response.output_item.added", output_index=0, item=self._message(None, "in_progress")),
                self._event("response.content_part.added", **self._at(), part=self._text_part(""))]

    def delta(self, text: str) -> list[bytes]:
        return [self._event("response.output_text.delta", **self._at(), delta=text, logprobs=[])]

    def closing(self, text: str, stats: GenerationStats) -> list[bytes]:
        response = self.completion(text, stats)
        item = response["output"][0]
        last = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [self._event("response.output_text.done", **self._at(), text=text, logprobs=[]),
                self._event("response.content_part.done", **self._at(), part=self._text_part(text)),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event(last, response=response)]

    def failure(self, error: Mapping[str, Any]) -> list[bytes]:
        """After the status was sent: an error event, then the response as failed."""
        body = error["error"]
        # A failed response's error code is one of OpenAI's few: ours where it is one, else the kind of fault.
        code = body.get("code") if body.get("code") in _FAILED_CODES else \
            "invalid_prompt" if body.get("type") == "invalid_request_error" else "server_error"
        return [self._event("error", code=body.get("code"), message=body["message"], param=body.get("param")),
                self._event("response.failed",
                            response=self._response("failed", [], error={"code": code, "message": body["message"]}))]
