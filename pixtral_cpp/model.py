"""The Python API: load a Pixtral GGUF pair once, then describe images and chat.

    with PixtralModel.load("~/models") as model:
        print(model.describe("photo.jpg").text)

Threads: one generation at a time per model. Every call that touches llama.cpp (describe, chat,
prompt_logits, close, and a stream from its first item until it ends or is closed) holds the model's
lock; calls from other threads wait for it. A CancelToken may be cancelled from any thread. A stream
must be iterated and closed by one thread; `astream_*` do that in a worker thread for asyncio.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pixtral_cpp.answer import Answerer, open_disk_cache
from pixtral_cpp.backend import TextModel, TextModelOptions, VisionContext, llama_supports_gpu_offload, set_verbose
from pixtral_cpp.call_forms import collected, describing, in_thread
from pixtral_cpp.control import CallControl, CancelToken, ProgressCallback
from pixtral_cpp.conversation import Message, normalize_messages
from pixtral_cpp.defaults import DEFAULT_PROMPT  # noqa: F401 - importable from here, as before
from pixtral_cpp.errors import PixtralError
from pixtral_cpp.fix_pair import runnable_mmproj
from pixtral_cpp.model_files import ModelFiles, PairInfo, check_pair, find_model_files
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.placement import Placement, plan_placement
from pixtral_cpp.results import Chunk
from pixtral_cpp.system import physical_cores

Messages = Sequence[Message | dict[str, Any]]


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
        mmproj = runnable_mmproj(files, self.info)  # a cached copy with [IMG_BREAK] if it lacks it (fix_pair.py)
        threads = self.options.threads or physical_cores()
        self.placement: Placement = plan_placement(self.options.gpu_layers, self.options.vision_gpu,
                                                   self.info.text.block_count, llama_supports_gpu_offload())
        control = CallControl(on_progress=on_progress)
        self._text = self._load_text(threads, control)
        try:
            self._vision = VisionContext(mmproj, self._text, threads=threads,
                                         use_gpu=self.placement.vision_on_gpu, flash_attn=self.options.flash_attn)
            control.report("load", 1.0, 1.0)
        except BaseException:
            self._text.close()  # closes the vision context too
            raise
        self._answerer = Answerer(self._text, self._vision, self.options, self.placement,
                                  open_disk_cache((files.text, files.mmproj), self.options, self.placement))
        self._lock = threading.RLock()
        self._busy = False  # a call holds the lock (guards against re-entry from the same thread)
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
             mmproj_quant: str | None = None, **option_fields: Any) -> PixtralModel:
        """From a .gguf (mmproj found beside it), a folder (`FOLDER:QUANT` chooses among several), a hub repo
        `user/repo[@REVISION][:QUANT]` (pulled into the Hugging Face cache), or the default models folder;
        `mmproj_quant` chooses among several projectors (default: F16, then BF16, F32, Q8_0)."""
        if option_fields:
            options = replace(options or ModelOptions(), **option_fields)
        return cls(find_model_files(model, mmproj, mmproj_quant), options, on_progress=on_progress)

    # -- lifetime -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free llama.cpp's model, context and vision context (idempotent)."""
        with self._lock:
            self._vision.close()
            self._text.close()
            if self._answerer.disk is not None:  # a process must not end before its prompt cache is written
                self._answerer.disk.flush()

    def __enter__(self) -> PixtralModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        return self._text.n_ctx

    @property
    def images_encoded(self) -> int:
        """Images run through the vision encoder over the model's lifetime (follow-ups should not add)."""
        return self._answerer.images_encoded

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
    # stream_chat is the one written out: the other five are built from it (pixtral_cpp.call_forms),
    # the describe forms with (images, prompt, options, *, system, ...) in place of the messages.

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
            yield from self._answerer.stream(conversation, options, CallControl(cancel, on_progress))

    chat = collected(
        stream_chat,
        """The assistant's answer to a conversation (system prompt, turns, images anywhere in user turns);
        after a cancel, what was generated so far.""")
    astream_chat = in_thread(
        stream_chat,
        """`stream_chat` run in a worker thread, for ``async for``; never blocks the event loop.
        Stopping early (break, aclose, task cancellation) stops the generation and frees the model.""")
    describe = describing(chat, "One question about one or more images (they come first, then the prompt).")
    stream_describe = describing(stream_chat, "`describe` as a stream of TextChunks, then GenerationStats.")
    astream_describe = describing(
        astream_chat, "`stream_describe` for asyncio: ``async for chunk in model.astream_describe(...)``.")

    def prompt_logits(self, messages: Messages, *, on_progress: ProgressCallback | None = None) -> np.ndarray:
        """Next-token logits (n_vocab,) after the conversation's prompt: for scoring and parity checks."""
        conversation = normalize_messages(messages, allow_local_files=True)
        with self._session():
            return self._answerer.prompt_logits(conversation, CallControl(on_progress=on_progress))


def _text_share(files: ModelFiles) -> float:
    """The text GGUF's part of the pair's bytes: how far its loading takes the load progress."""
    text, mmproj = files.text.stat().st_size, files.mmproj.stat().st_size
    return text / (text + mmproj) if text + mmproj else 1.0
