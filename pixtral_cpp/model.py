"""The Python API: load a Pixtral GGUF pair once, then describe images and chat.

    with PixtralModel.load("~/models") as model:
        print(model.describe("photo.jpg").text)

One model serves one conversation at a time; calls are serialized by a lock (see `chat`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pixtral_cpp.backend import TextModel, TextModelOptions, VisionContext, set_verbose
from pixtral_cpp.conversation import (Image, ImageSlot, Message, PromptPlan, SpecialTokens, Text, build_prompt,
                                      normalize_messages)
from pixtral_cpp.errors import ContextLengthError
from pixtral_cpp.generate import generate_tokens
from pixtral_cpp.images import ImageSource, prepare_image
from pixtral_cpp.model_files import ModelFiles, PairInfo, check_pair, find_model_files
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.prompt_cache import ImageRun, PromptCache, Run, TokenRun, image_key
from pixtral_cpp.results import Chunk, Completion, GenerationStats, TextChunk
from pixtral_cpp.system import physical_cores

DEFAULT_PROMPT = "Describe this image in detail."


class PixtralModel:
    """A loaded text model + vision projector, with the conversation state of the last call."""

    def __init__(self, files: ModelFiles, options: ModelOptions | None = None) -> None:
        self.options = options or ModelOptions()
        self.files = files
        set_verbose(self.options.verbose)
        self.info: PairInfo = check_pair(files)  # before llama.cpp sees a mismatched pair
        threads = self.options.threads or physical_cores()
        self._text = TextModel(files.text, TextModelOptions(
            n_ctx=self.options.n_ctx, n_batch=self.options.n_batch, n_threads=threads,
            n_gpu_layers=self.options.gpu_layers, use_mmap=self.options.use_mmap,
            repack_weights=self.options.repack_weights, kv_cache_type=self.options.kv_cache_type,
            flash_attn=self.options.flash_attn))
        try:
            self._vision = VisionContext(files.mmproj, self._text, threads=threads, use_gpu=self.options.vision_gpu,
                                         flash_attn=self.options.flash_attn)
        except BaseException:
            self._text.close()
            raise
        self._specials = SpecialTokens.from_model(self._text)
        self._cache = PromptCache(self.options.image_cache_size)
        self._lock = threading.RLock()
        self.images_encoded = 0  # over the model's lifetime; follow-up questions should not add to it

    @classmethod
    def load(cls, model: Path | str | None = None, mmproj: Path | str | None = None,
             options: ModelOptions | None = None, **option_fields: Any) -> PixtralModel:
        """From a .gguf (mmproj found beside it), a folder `convert` wrote, or the default models folder."""
        if option_fields:
            options = replace(options or ModelOptions(), **option_fields)
        return cls(find_model_files(model, mmproj), options)

    # -- lifetime -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free llama.cpp's model, context and vision context (idempotent)."""
        with self._lock:
            self._vision.close()
            self._text.close()

    def __enter__(self) -> PixtralModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        return self._text.n_ctx

    # -- asking -----------------------------------------------------------------------------------------

    def describe(self, images: ImageSource | Sequence[ImageSource], prompt: str = DEFAULT_PROMPT,
                 options: GenerationOptions | None = None, *, system: str | None = None,
                 **option_fields: Any) -> Completion:
        """One question about one or more images (they come first, then the prompt)."""
        return self.chat(_describe_messages(images, prompt, system), options, **option_fields)

    def stream_describe(self, images: ImageSource | Sequence[ImageSource], prompt: str = DEFAULT_PROMPT,
                        options: GenerationOptions | None = None, *, system: str | None = None,
                        **option_fields: Any) -> Iterator[Chunk]:
        return self.stream_chat(_describe_messages(images, prompt, system), options, **option_fields)

    def chat(self, messages: Sequence[Message | dict[str, Any]], options: GenerationOptions | None = None,
             **option_fields: Any) -> Completion:
        """The assistant's answer to a conversation (system prompt, turns, images anywhere in user turns)."""
        parts: list[str] = []
        for chunk in self.stream_chat(messages, options, **option_fields):
            if isinstance(chunk, TextChunk):
                parts.append(chunk.text)
            else:
                return Completion("".join(parts), chunk)
        raise AssertionError("a stream always ends with its statistics")

    def stream_chat(self, messages: Sequence[Message | dict[str, Any]], options: GenerationOptions | None = None,
                    **option_fields: Any) -> Iterator[Chunk]:
        """Text chunks as they are generated, then GenerationStats. Closing the iterator early stops
        generation cleanly; the model lock is held until the stream ends or is closed."""
        if option_fields:
            options = replace(options or GenerationOptions(), **option_fields)
        options = options or GenerationOptions()
        conversation = normalize_messages(messages, allow_local_files=True)
        with self._lock:
            yield from self._answer(conversation, options)

    def prompt_logits(self, messages: Sequence[Message | dict[str, Any]]) -> np.ndarray:
        """Next-token logits (n_vocab,) after the conversation's prompt: for scoring and parity checks."""
        conversation = normalize_messages(messages, allow_local_files=True)
        with self._lock:
            runs, _ = self._runs(build_prompt(conversation, self._tokenize, self._specials))
            self._check_fits(runs)
            return self._evaluate(runs)[1]

    # -- the work -----------------------------------------------------------------------------------------

    def _answer(self, conversation: list[Message], options: GenerationOptions) -> Iterator[Chunk]:
        plan = build_prompt(conversation, self._tokenize, self._specials)
        encode_started = time.monotonic()
        runs, encoded = self._runs(plan)
        encode_seconds = time.monotonic() - encode_started
        n_prompt = self._check_fits(runs)
        prompt_started = time.monotonic()
        reused, _ = self._evaluate(runs)
        prompt_seconds = time.monotonic() - prompt_started
        seed = options.seed if options.seed is not None else self.options.seed
        budget = min(options.max_tokens, self.n_ctx - n_prompt)
        generation_started = time.monotonic()
        outcome = yield from generate_tokens(self._text, self._cache, options, seed, budget)
        yield GenerationStats(
            prompt_tokens=n_prompt, reused_tokens=reused,
            image_tokens=sum(r.embedding.n_positions + 1 for r in runs if isinstance(r, ImageRun)),
            images_encoded=encoded, image_encode_seconds=encode_seconds, prompt_seconds=prompt_seconds,
            generated_tokens=outcome.tokens, generation_seconds=time.monotonic() - generation_started,
            finish_reason=outcome.finish_reason)

    def _check_fits(self, runs: list[Run]) -> int:
        n_prompt = sum(len(run.keys()) for run in runs)
        if n_prompt >= self.n_ctx:
            n_image = sum(len(run.keys()) for run in runs if isinstance(run, ImageRun))
            raise ContextLengthError(
                f"the prompt needs {n_prompt} positions ({n_image} for images) but the context holds "
                f"{self.n_ctx}; raise the context size (--ctx), lower the image budget (--max-image-size) "
                f"or ask about fewer images")
        return n_prompt

    def _tokenize(self, text: str) -> list[int]:
        return self._text.tokenize(text, add_special=False, parse_special=False)

    def _runs(self, plan: PromptPlan) -> tuple[list[Run], int]:
        """Token runs and encoded images in prompt order; returns how many images were encoded now."""
        runs: list[Run] = []
        encoded = 0
        for item in plan.items:
            if not isinstance(item, ImageSlot):
                runs.append(TokenRun(tuple(item)))
                continue
            prepared = prepare_image(plan.images[item.index].source, max_image_size=self.options.max_image_size)
            key = image_key(prepared.pixels)
            embedding = self._cache.embedding(key)
            if embedding is None:
                embedding = self._vision.encode_rgb(prepared.pixels)  # checks every value is finite
                self._cache.remember(key, embedding)
                encoded += 1
                self.images_encoded += 1
            runs.append(ImageRun(key, embedding))
        return runs, encoded

    def _evaluate(self, runs: list[Run]) -> tuple[int, np.ndarray]:
        """Bring the KV cache to exactly `runs`, reusing the common prefix: (reused positions, last logits)."""
        keep = self._cache.reusable_prefix(runs)
        self._text.trim(keep)
        self._cache.keys = self._cache.keys[:keep]
        position, logits = 0, np.empty(0, np.float32)
        try:
            for run in runs:
                keys = run.keys()
                end = position + len(keys)
                if end > keep:
                    if isinstance(run, ImageRun):
                        self._text.decode_embeddings(run.embedding.embeddings)
                    else:
                        logits = self._text.eval_tokens(run.tokens[max(keep - position, 0):])
                    self._cache.keys.extend(keys[max(keep - position, 0):])
                position = end
        except BaseException:
            self._cache.forget()
            self._text.clear()
            raise
        return keep, logits


def _describe_messages(images: ImageSource | Sequence[ImageSource], prompt: str, system: str | None
                       ) -> list[Message]:
    if isinstance(images, (str, Path, bytes, bytearray)) or not isinstance(images, Sequence):
        images = [images]
    messages = [Message("system", (Text(system),))] if system else []
    messages.append(Message("user", (*(Image(source) for source in images), Text(prompt))))
    return messages
