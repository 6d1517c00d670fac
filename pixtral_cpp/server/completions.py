"""The legacy /v1/completions protocol: one plain-text prompt in, text out (streamed or not).

The prompt is one user turn in Pixtral's chat template (`[INST] prompt [/INST]`), not raw text as
llama-server takes it: every prompt pixtral-cpp builds is mistral-common's, tokenized by its rule, and
Pixtral is an instruct model, so a bare continuation prompt would mostly be answered as a question anyway.
`echo` puts the prompt in front of the answer, as OpenAI does.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pixtral_cpp.conversation import Message
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import GenerationStats
from pixtral_cpp.server.config import ServerConfig
from pixtral_cpp.server.protocol import (
    RequestError,
    chat_messages,
    check_model_name,
    generation_options,
    json_object,
    typed_field,
)
from pixtral_cpp.server.responses import done_event, finish_reason, sse_event, usage

# Fields of OpenAI's completions API that change the answer in ways this server does not do, with the
# values that change nothing.
_REFUSED = {"suffix": ("suffix (fill-in-the-middle) is not supported", (None, "")),
            "logprobs": ("logprobs are not reported by this server", (None,)),
            "best_of": ("best_of must be 1: one answer per request", (None, 1))}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/completions request."""

    messages: list[Message]
    options: GenerationOptions
    prompt: str
    stream: bool
    include_usage: bool
    echo: bool


def parse_completion_request(body: bytes, config: ServerConfig) -> CompletionRequest:
    """Validate a /v1/completions body (text only: nothing to decode)."""
    data = json_object(body)
    check_model_name(data, config)
    if typed_field(data, "n", int, 1) != 1:
        raise RequestError(400, "n must be 1: one answer per request", param="n")
    for name, (why, harmless) in _REFUSED.items():
        if data.get(name) not in harmless:
            raise RequestError(400, why, param=name)
    prompt = _prompt(data.get("prompt"))
    stream = typed_field(data, "stream", bool, False)
    stream_options = typed_field(data, "stream_options", dict, None) or {}
    options = generation_options(data, config, max_tokens_fields=("max_tokens",))
    messages = chat_messages([{"role": "user", "content": prompt}], config, param="prompt")
    return CompletionRequest(messages=messages, options=options, prompt=prompt, stream=stream,
                             include_usage=bool(stream_options.get("include_usage")),
                             echo=typed_field(data, "echo", bool, False))


def _prompt(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(item, (int, list)) for item in value):
        raise RequestError(400, "prompt as token arrays is not accepted: send the text", param="prompt")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # what the openai client sends for a single prompt given as a list
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and len(value) > 1:
        raise RequestError(400, f"prompt holds {len(value)} prompts; send one per request", param="prompt")
    raise RequestError(400, "prompt must be a non-empty string", param="prompt")


class CompletionFormat:
    """text_completion objects: the whole answer, or chunks of it ending in [DONE]."""

    def __init__(self, request: CompletionRequest, model: str) -> None:
        self.request, self.model = request, model
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _object(self, text: str, finish: str | None, stats: GenerationStats | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model,
                                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if stats is not None:
            body["usage"] = usage(stats)
        return body

    def completion(self, text: str, stats: GenerationStats) -> dict[str, Any]:
        shown = self.request.prompt + text if self.request.echo else text
        return self._object(shown, finish_reason(stats), stats)

    def opening(self) -> list[bytes]:
        return [sse_event(self._object(self.request.prompt, None))] if self.request.echo else []

    def delta(self, text: str) -> list[bytes]:
        return [sse_event(self._object(text, None))]

    def closing(self, text: str, stats: GenerationStats) -> list[bytes]:
        events = [sse_event(self._object("", finish_reason(stats)))]
        if self.request.include_usage:
            last = self._object("", None, stats)
            last["choices"] = []  # as chat's usage chunk: counts only
            events.append(sse_event(last))
        return [*events, done_event()]

    def failure(self, error: dict[str, Any]) -> list[bytes]:
        return [sse_event(json.dumps(error)), done_event()]
