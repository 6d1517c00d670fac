"""The Python API: load a Pixtral GGUF pair once, then describe images and chat.

    with PixtralModel.load("~/models") as model:
        print(model.describe("photo.jpg").text)

Threads: one generation at a time per model. Every call that touches llama.cpp (describe, chat,
prompt_logits, close, and a stream from its first item until it ends or is closed) holds the model's
lock; calls from other threads wait for it. A CancelToken may be cancelled from any thread. A stream
must be iterated and closed by one thread; `astream_*` do that in a worker thread for asyncio.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pixtral_cpp.aio import stream_in_thread
from pixtral_cpp.backend import (
    ImageEmbedding,
    TextModel,
    TextModelOptions,
    VisionContext,
    json_schema_grammar,
    llama_supports_gpu_offload,
    set_verbose,
)
from pixtral_cpp.control import CallControl, CancelToken, GenerationCancelled, ProgressCallback
from pixtral_cpp.conversation import (
    Image,
    ImageSlot,
    Message,
    PromptPlan,
    SpecialTokens,
    Text,
    build_prompt,
    normalize_messages,
)
from pixtral_cpp.errors import ConversationError, PixtralError
from pixtral_cpp.generate import Outcome, generate_tokens
from pixtral_cpp.images import ImageSource
from pixtral_cpp.model_files import ModelFiles, PairInfo, check_pair, find_model_files
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.placement import Placement, plan_placement
from pixtral_cpp.prompt_cache import ImageRun, Key, PromptCache, Run, TokenRun
from pixtral_cpp.prompt_fit import StagedImage, check_prompt_fits, stage_images
from pixtral_cpp.results import Chunk, Completion, FinishReason, GenerationStats, TextChunk
from pixtral_cpp.system import physical_cores
from pixtral_cpp.valid_text import check_text

DEFAULT_PROMPT = "Describe this image in detail."

Messages = Sequence[Message | dict[str, Any]]
Piece = tuple[list[Key], tuple[int, ...] | np.ndarray]  # keys of a batch, its tokens or embedding rows


class ModelBusyError(PixtralError):
    """A second call on a model from the thread whose stream on it is still open."""


class PixtralModel:
    """A loaded text model + vision projector, with the conversation state of the last call."""

    def __init__(self, files: ModelFiles, options: ModelOptions | None = None, *,
                 on_progress: ProgressCallback | None = None) -> None:
        """`on_progress` gets ProgressEvent("load", fraction, 1.0); an exception it raises aborts the load."""
        started = time.monotonic()
        self.options = options or ModelOptions()
        self.files = files
        set_verbose(self.options.verbose)
        self.info: PairInfo = check_pair(files)  # before llama.cpp sees a mismatched pair
        threads = self.options.threads or physical_cores()
        self.placement: Placement = plan_placement(self.options.gpu_layers, self.options.vision_gpu,
                                                   self.info.text.block_count, llama_supports_gpu_offload())
        control = CallControl(on_progress=on_progress)
        self._text = self._load_text(threads, control)
        try:
            self._vision = VisionContext(files.mmproj, self._text, threads=threads,
                                         use_gpu=self.placement.vision_on_gpu, flash_attn=self.options.flash_attn)
            control.report("load", 1.0, 1.0)
        except BaseException:
            self._text.close()  # closes the vision context too
            raise
        self._specials = SpecialTokens.from_model(self._text)
        self._cache = PromptCache(self.options.image_cache_size)
        self._lock = threading.RLock()
        self._busy = False  # a call holds the lock (guards against re-entry from the same thread)
        self.images_encoded = 0  # over the model's lifetime; follow-up questions should not add to it
        self.load_seconds = time.monotonic() - started  # checks, text model, vision encoder, warm-ups

    def _load_text(self, threads: int, control: CallControl) -> TextModel:
        # llama.cpp reports the text model's share of the load; the mmproj (no progress of its own)
        # completes it.
        share = _text_share(self.files)
        options = self.options
        return TextModel(self.files.text, TextModelOptions(
            n_ctx=options.n_ctx, n_batch=options.n_batch, n_threads=threads,
            n_gpu_layers=self.placement.text_layers_on_gpu,
            use_mmap=options.use_mmap, repack_weights=options.repack_weights,
            kv_cache_type=options.kv_cache_type, flash_attn=options.flash_attn),
            on_progress=(lambda fraction: control.report("load", fraction * share, 1.0))
            if control.on_progress else None)

    @classmethod
    def load(cls, model: Path | str | None = None, mmproj: Path | str | None = None,
             options: ModelOptions | None = None, *, on_progress: ProgressCallback | None = None,
             **option_fields: Any) -> PixtralModel:
        """From a .gguf (mmproj found beside it), a folder `convert` wrote, or the default models folder."""
        if option_fields:
            options = replace(options or ModelOptions(), **option_fields)
        return cls(find_model_files(model, mmproj), options, on_progress=on_progress)

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

    @contextmanager
    def _session(self) -> Iterator[None]:
        """Hold the lock for one call. The lock is reentrant (close() inside an open stream must not
        deadlock), so a second call from the thread holding it is refused instead of corrupting the cache."""
        with self._lock:
            if self._busy:
                raise ModelBusyError("this thread still has an unfinished stream on the model; "
                                     "exhaust or close() it before the next call")
            self._busy = True
            try:
                yield
            finally:
                self._busy = False

    # -- asking -----------------------------------------------------------------------------------------
    # cancel: a CancelToken checked before each image, between prompt batches and between tokens; the
    # answer then ends with finish_reason "cancelled". on_progress: ProgressEvents for the "image" and
    # "prompt" stages, called in the thread running the call; an exception it raises aborts the call.

    def describe(self, images: ImageSource | Sequence[ImageSource], prompt: str = DEFAULT_PROMPT,
                 options: GenerationOptions | None = None, *, system: str | None = None,
                 cancel: CancelToken | None = None, on_progress: ProgressCallback | None = None,
                 **option_fields: Any) -> Completion:
        """One question about one or more images (they come first, then the prompt)."""
        return self.chat(_describe_messages(images, prompt, system), options, cancel=cancel,
                         on_progress=on_progress, **option_fields)

    def stream_describe(self, images: ImageSource | Sequence[ImageSource], prompt: str = DEFAULT_PROMPT,
                        options: GenerationOptions | None = None, *, system: str | None = None,
                        cancel: CancelToken | None = None, on_progress: ProgressCallback | None = None,
                        **option_fields: Any) -> Iterator[Chunk]:
        """`describe` as a stream of TextChunks, then GenerationStats."""
        return self.stream_chat(_describe_messages(images, prompt, system), options, cancel=cancel,
                                on_progress=on_progress, **option_fields)

    def astream_describe(self, images: ImageSource | Sequence[ImageSource], prompt: str = DEFAULT_PROMPT,
                         options: GenerationOptions | None = None, *, system: str | None = None,
                         cancel: CancelToken | None = None, on_progress: ProgressCallback | None = None,
                         **option_fields: Any) -> AsyncIterator[Chunk]:
        """`stream_describe` for asyncio: ``async for chunk in model.astream_describe(...)``."""
        return self.astream_chat(_describe_messages(images, prompt, system), options, cancel=cancel,
                                 on_progress=on_progress, **option_fields)

    def chat(self, messages: Messages, options: GenerationOptions | None = None, *,
             cancel: CancelToken | None = None, on_progress: ProgressCallback | None = None,
             **option_fields: Any) -> Completion:
        """The assistant's answer to a conversation (system prompt, turns, images anywhere in user turns);
        after a cancel, what was generated so far."""
        parts: list[str] = []
        stream = self.stream_chat(messages, options, cancel=cancel, on_progress=on_progress, **option_fields)
        for chunk in stream:
            if isinstance(chunk, TextChunk):
                parts.append(chunk.text)
            else:
                return Completion("".join(parts), chunk)
        raise AssertionError("a stream always ends with its statistics")

    def stream_chat(self, messages: Messages, options: GenerationOptions | None = None, *,
                    cancel: CancelToken | None = None, on_progress: ProgressCallback | None = None,
                    **option_fields: Any) -> Iterator[Chunk]:
        """Text chunks as they are generated, then GenerationStats. Closing the iterator early stops
        generation cleanly; the model lock is held until the stream ends or is closed."""
        if option_fields:
            options = replace(options or GenerationOptions(), **option_fields)
        options = options or GenerationOptions()
        conversation = normalize_messages(messages, allow_local_files=True)
        with self._session():
            yield from self._answer(conversation, options, CallControl(cancel, on_progress))

    def astream_chat(self, messages: Messages, options: GenerationOptions | None = None, *,
                     cancel: CancelToken | None = None, on_progress: ProgressCallback | None = None,
                     **option_fields: Any) -> AsyncIterator[Chunk]:
        """`stream_chat` run in a worker thread, for ``async for``; never blocks the event loop.
        Stopping early (break, aclose, task cancellation) stops the generation and frees the model."""
        return stream_in_thread(lambda token: self.stream_chat(
            messages, options, cancel=token, on_progress=on_progress, **option_fields), cancel)

    def prompt_logits(self, messages: Messages, *, on_progress: ProgressCallback | None = None) -> np.ndarray:
        """Next-token logits (n_vocab,) after the conversation's prompt: for scoring and parity checks."""
        conversation = normalize_messages(messages, allow_local_files=True)
        control = CallControl(on_progress=on_progress)
        with self._session():
            # Tokenized exactly as mistral-common does (no remembered answers): scores must not depend on history.
            runs = self._runs(build_prompt(conversation, self._tokenize, self._specials), control, self._tally())
            return self._evaluate(runs, control)[1]

    # -- the work -----------------------------------------------------------------------------------------

    def _answer(self, conversation: list[Message], options: GenerationOptions, control: CallControl
                ) -> Iterator[Chunk]:
        tally = self._tally()
        # A schema the converter cannot express fails here, before minutes of image prefill.
        grammar = json_schema_grammar(options.json_schema) if options.json_schema is not None else None
        try:
            n_prompt = self._prepare_prompt(conversation, control, tally)
        except GenerationCancelled:
            yield tally.stats(0, 0.0, "cancelled")
            return
        seed = options.seed if options.seed is not None else self.options.seed
        budget = min(options.max_tokens, self.n_ctx - n_prompt)
        started = time.monotonic()
        outcome = yield from generate_tokens(self._text, self._cache, options, seed, budget, control.cancel,
                                             grammar)
        self._remember_answer(outcome)
        yield tally.stats(outcome.tokens, time.monotonic() - started, outcome.finish_reason)

    def _remember_answer(self, outcome: Outcome) -> None:
        # Only answers whose text is exactly what the tokens say: not cut by a stop string or a cancel,
        # and without the trailing spaces the prompt builder strips.
        if outcome.finish_reason in ("length", "stop") and outcome.text and outcome.text == outcome.text.rstrip(" "):
            self._cache.remember_answer(outcome.text, outcome.token_ids)

    def _prepare_prompt(self, conversation: list[Message], control: CallControl, tally: _Tally) -> int:
        """Encode the images and evaluate the prompt, recording what it cost in `tally`; prompt positions."""
        plan = build_prompt(conversation, self._tokenize, self._specials, self._cache.answers)
        started = time.monotonic()
        try:
            runs = self._runs(plan, control, tally)
        finally:
            tally.image_encode_seconds = time.monotonic() - started
        tally.prompt_tokens = sum(len(run.keys()) for run in runs)
        tally.image_tokens = sum(r.embedding.n_positions + 1 for r in runs if isinstance(r, ImageRun))
        started = time.monotonic()
        try:
            tally.reused_tokens = self._evaluate(runs, control)[0]
        finally:
            tally.prompt_seconds = time.monotonic() - started
        return tally.prompt_tokens

    def _tokenize(self, text: str) -> list[int]:
        return self._text.tokenize(text, add_special=False, parse_special=False)

    def _runs(self, plan: PromptPlan, control: CallControl, tally: _Tally) -> list[Run]:
        """Token runs and encoded images in prompt order; counts the images encoded now in `tally`.

        Every image is prepared (or found in the cache) and the prompt checked against the context
        before the first one is encoded: a prompt that cannot fit costs no vision encoder time.
        """
        staged = stage_images(plan, self._cache, self.options.max_image_size, control)
        check_prompt_fits(plan, staged, self.n_ctx)
        if staged:
            control.report("image", 0, len(staged))
        embeddings = []
        for done, image in enumerate(staged, 1):
            control.check()  # before encoding: an encode cannot be interrupted once started
            embeddings.append(self._encode(image, tally))
            control.report("image", done, len(staged))
        return [ImageRun(staged[item.index].key, embeddings[item.index]) if isinstance(item, ImageSlot)
                else TokenRun(tuple(item)) for item in plan.items]

    def _encode(self, image: StagedImage, tally: _Tally) -> ImageEmbedding:
        # Looked up again: the same image twice in one prompt is encoded once.
        embedding = image.embedding if image.embedding is not None else self._cache.embedding(image.key)
        if embedding is None:
            embedding = self._vision.encode_rgb(image.pixels)  # checks every value is finite
            self._cache.remember(image.key, embedding)
            tally.images_encoded += 1
            self.images_encoded += 1
        return embedding

    def _evaluate(self, runs: list[Run], control: CallControl) -> tuple[int, np.ndarray]:
        """Bring the KV cache to exactly `runs`, reusing the common prefix: (reused positions, last logits).

        Decoded one batch at a time so a cancel or a progress callback can stop between batches:
        `cache.keys` always names exactly the positions in the KV cache (a partly decoded image is
        never reused: `reusable_prefix` stops at an image's start).
        """
        keep = self._cache.reusable_prefix(runs)
        self._text.trim(keep)
        self._cache.keys = self._cache.keys[:keep]
        pieces = _pieces(runs, keep, self.options.n_batch)
        total, done = sum(len(keys) for keys, _ in pieces), 0
        control.report("prompt", 0, total)
        logits = np.empty(0, np.float32)
        for keys, payload in pieces:
            control.check()
            logits = self._decode_piece(keys, payload, logits)
            done += len(keys)
            control.report("prompt", done, total)
        return keep, logits

    def _tally(self) -> _Tally:
        return _Tally(text_layers_on_gpu=self.placement.text_layers_on_gpu,
                      vision_on_gpu=self.placement.vision_on_gpu)

    def _decode_piece(self, keys: list[Key], payload: tuple[int, ...] | np.ndarray, logits: np.ndarray
                      ) -> np.ndarray:
        """Append one batch to the KV cache; the logits of its last token (`logits` for embeddings)."""
        try:
            if isinstance(payload, np.ndarray):
                self._text.decode_embeddings(payload)
            else:
                logits = self._text.eval_tokens(payload)
        except BaseException:
            self._cache.forget()  # a failed decode leaves the KV cache unknown: start over next time
            self._text.clear()
            raise
        self._cache.keys.extend(keys)
        return logits


@dataclass
class _Tally:
    """What one answer cost, filled in as it goes (a cancelled answer reports what it got to)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    image_tokens: int = 0
    images_encoded: int = 0
    image_encode_seconds: float = 0.0
    prompt_seconds: float = 0.0
    text_layers_on_gpu: int = 0
    vision_on_gpu: bool = False

    def stats(self, generated: int, generation_seconds: float, finish_reason: FinishReason
              ) -> GenerationStats:
        return GenerationStats(
            prompt_tokens=self.prompt_tokens, reused_tokens=self.reused_tokens,
            image_tokens=self.image_tokens,
            images_encoded=self.images_encoded, image_encode_seconds=self.image_encode_seconds,
            prompt_seconds=self.prompt_seconds, generated_tokens=generated,
            generation_seconds=generation_seconds, finish_reason=finish_reason,
            text_layers_on_gpu=self.text_layers_on_gpu, vision_on_gpu=self.vision_on_gpu)


def _pieces(runs: list[Run], keep: int, n_batch: int) -> list[Piece]:
    """The positions of `runs` after the first `keep`, in batches of at most `n_batch`."""
    pieces: list[Piece] = []
    position = 0
    for run in runs:
        keys = run.keys()
        skip = max(keep - position, 0)  # never inside an image (see PromptCache.reusable_prefix)
        position += len(keys)
        payload = run.embedding.embeddings if isinstance(run, ImageRun) else run.tokens
        for start in range(skip, len(keys), n_batch):
            pieces.append((keys[start:start + n_batch], payload[start:start + n_batch]))
    return pieces


def _text_share(files: ModelFiles) -> float:
    """The text GGUF's part of the pair's bytes: how far its loading takes the load progress."""
    text, mmproj = files.text.stat().st_size, files.mmproj.stat().st_size
    return text / (text + mmproj) if text + mmproj else 1.0


def _describe_messages(images: ImageSource | Sequence[ImageSource], prompt: str, system: str | None
                       ) -> list[Message]:
    check_text(prompt, "the prompt")  # named here; Message would only say "part N"
    if system is not None:
        check_text(system, "the system prompt")
    # One image unless a list of them: str, bytes and memoryview are Sequences too
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
        images = [images]
    elif not images:
        raise ConversationError("describe() needs at least one image, got none; use chat() for a question "
                                "without images")
    messages = [Message("system", (Text(system),))] if system else []
    messages.append(Message("user", (*(Image(source) for source in images), Text(prompt))))
    return messages
