"""The OpenAI chat-completions protocol's response objects: completions, chunks, server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pixtral_cpp.results import GenerationStats
from pixtral_cpp.server.config import ServerConfig


def finish_reason(stats: GenerationStats) -> str:
    """OpenAI's name: a stop string ends an answer like the end token does."""
    return "length" if stats.finish_reason == "length" else "stop"


def usage(stats: GenerationStats) -> dict[str, Any]:
    # OpenAI's cached_tokens: the prompt positions not evaluated again, kept in memory or restored from disk.
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens + stats.restored_tokens}}


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
    """The model as /v1/models lists it; `metadata` says which names requests may use for it."""
    return {"id": config.model_id, "object": "model", "created": created, "owned_by": "pixtral-cpp",
            "aliases": list(config.model_aliases),
            "metadata": {"accepts_any_model_name": not config.strict_model_name,
                         "names": list(config.model_names),
                         "note": "the only model served: requests may name it by its id or an alias"
                                 if config.strict_model_name else
                                 "the only model served: a request naming any model gets this one"}}


def sse_event(data: Mapping[str, Any] | Sequence[Any] | str) -> bytes:
    """One server-sent event; OpenAI's stream is `data: <json>` events and a final `data: [DONE]`."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def done_event() -> bytes:
    """The end of an OpenAI chat or completions stream."""
    return sse_event("[DONE]")


class ChatFormat:
    """/v1/chat/completions answers: a chat.completion, or its chunk stream ending in [DONE]."""

    def __init__(self, header: ResponseHeader, include_usage: bool) -> None:
        self.header, self.include_usage = header, include_usage

    def completion(self, text: str, stats: GenerationStats) -> dict[str, Any]:
        return self.header.completion(text, stats)

    def opening(self) -> list[bytes]:
        return [sse_event(self.header.chunk({"role": "assistant", "content": ""}))]

    def delta(self, text: str) -> list[bytes]:
        return [sse_event(self.header.chunk({"content": text}))]

    def closing(self, text: str, stats: GenerationStats) -> list[bytes]:
        events = [sse_event(self.header.chunk({}, finish_reason(stats)))]
        if self.include_usage:
            events.append(sse_event(self.header.chunk({}, usage_counts=usage(stats))))
        return [*events, done_event()]

    def failure(self, error: dict[str, Any]) -> list[bytes]:
        """After the status was sent: the error body as an event (OpenAI clients raise on it), then [DONE]."""
        return [sse_event(json.dumps(error)), done_event()]  # ASCII: a message may quote a lone surrogate
