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
    return {"id": config.model_id, "object": "model", "created": created, "owned_by": "pixtral-cpp"}


def sse_event(data: Mapping[str, Any] | Sequence[Any] | str) -> bytes:
    """One server-sent event; OpenAI's stream is `data: <json>` events and a final `data: [DONE]`."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
