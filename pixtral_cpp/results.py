"""What a generation returns: streamed text chunks, then statistics."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length", "stop_string", "cancelled"]


@dataclass(frozen=True)
class TextChunk:
    """A piece of the answer, never splitting a UTF-8 character."""

    text: str


@dataclass(frozen=True)
class GenerationStats:
    """The last item of every stream, and part of every Completion."""

    prompt_tokens: int  # positions of the prompt, image positions included
    reused_tokens: int  # of those, taken from the KV cache of the previous turn
    image_tokens: int  # positions of the images in the prompt
    images_encoded: int  # images run through the vision encoder for this answer (cached ones are not)
    image_encode_seconds: float
    prompt_seconds: float  # evaluating the prompt positions that were not reused
    generated_tokens: int
    generation_seconds: float
    finish_reason: FinishReason
    text_layers_on_gpu: int = 0  # where it ran (see PixtralModel.placement)
    vision_on_gpu: bool = False
    restored_tokens: int = 0  # of the prompt positions, restored from the prompt cache on disk
    restore_seconds: float = 0.0  # reading, checking and restoring them

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.reused_tokens - self.restored_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generated_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt_tokens_per_second"] = round(self.prompt_tokens_per_second, 2)
        data["generated_tokens_per_second"] = round(self.generated_tokens_per_second, 2)
        return data


Chunk = TextChunk | GenerationStats


@dataclass(frozen=True)
class Completion:
    text: str
    stats: GenerationStats

    def json(self) -> Any:
        """The answer parsed as JSON (for schema-constrained generations)."""
        return json.loads(self.text)
