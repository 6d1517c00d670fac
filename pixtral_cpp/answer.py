"""One answer on a loaded pair: stage and encode the images, bring the prompt into the KV cache, generate.

The caller (PixtralModel) holds the model's lock around every method here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixtral_cpp.backend import ImageEmbedding, TextModel, VisionContext, json_schema_grammar
from pixtral_cpp.build_presets import LLAMA_PACKAGE
from pixtral_cpp.control import CallControl, GenerationCancelled
from pixtral_cpp.conversation import ImageSlot, Message, PromptPlan, SpecialTokens, build_prompt
from pixtral_cpp.defaults import DISK_CACHE_MIN_NEW_POSITIONS
from pixtral_cpp.disk_cache import DiskCache, identity_digest
from pixtral_cpp.errors import BackendError
from pixtral_cpp.generate import Outcome, generate_tokens
from pixtral_cpp.kv_cache import ImageRun, ImageSpan, Key, KVCache, Run, TokenRun
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.paths import default_prompt_cache_dir
from pixtral_cpp.placement import Placement
from pixtral_cpp.prompt_cache import PromptCache
from pixtral_cpp.prompt_fit import StagedImage, check_prompt_fits, stage_images
from pixtral_cpp.results import Chunk, FinishReason, GenerationStats
from pixtral_cpp.tekken_tokenizer import prompt_tokenizer

Piece = tuple[Run, int, int]  # one batch: positions start:stop of a run

log = logging.getLogger(__name__)


class Answerer:
    """The conversation state of a text model and its vision encoder: KV cache and memo tables."""

    def __init__(self, text: TextModel, vision: VisionContext, options: ModelOptions, placement: Placement,
                 disk: DiskCache | None = None) -> None:
        self._text, self._vision = text, vision
        self._options, self._placement = options, placement
        self._specials = SpecialTokens.from_model(text)
        self._tokenize = prompt_tokenizer(text)  # tekken's own rule, not llama.cpp's (tekken_tokenizer.py)
        self.kv = KVCache(text)
        self.memo = PromptCache(options.image_cache_size)
        self.images_encoded = 0  # over the model's lifetime; follow-up questions should not add to it
        self.disk = disk  # the prompt cache on disk; None: off

    def stream(self, conversation: list[Message], options: GenerationOptions, control: CallControl
               ) -> Iterator[Chunk]:
        """The answer's text chunks, then its GenerationStats."""
        tally = self._tally()
        # A schema the converter cannot express fails here, before minutes of image prefill.
        grammar = json_schema_grammar(options.json_schema) if options.json_schema is not None else None
        try:
            n_prompt = self._prepare_prompt(conversation, control, tally)
        except GenerationCancelled:
            yield tally.stats(0, 0.0, "cancelled")
            return
        seed = options.seed if options.seed is not None else self._options.seed
        budget = min(options.max_tokens, self._text.n_ctx - n_prompt)
        started = time.monotonic()
        outcome = yield from generate_tokens(self._text, self.kv, options, seed, budget, control.cancel, grammar)
        self._remember_answer(outcome)
        yield tally.stats(outcome.tokens, time.monotonic() - started, outcome.finish_reason)

    def prompt_logits(self, conversation: list[Message], control: CallControl) -> np.ndarray:
        """Next-token logits (n_vocab,) after the conversation's prompt."""
        # Tokenized exactly as mistral-common does (no remembered answers): scores must not depend on history.
        runs = self._runs(build_prompt(conversation, self.tokenize, self._specials), control, self._tally())
        return self._evaluate(runs, control)[1]

    def tokenize(self, text: str) -> list[int]:
        """Plain text as the prompt builder encodes it: no BOS, control tokens not parsed."""
        return self._tokenize(text)

    def _remember_answer(self, outcome: Outcome) -> None:
        # Only answers whose text is exactly what the tokens say: not cut by a stop string or a cancel,
        # and without the trailing spaces the prompt builder strips.
        if outcome.finish_reason in ("length", "stop") and outcome.text and outcome.text == outcome.text.rstrip(" "):
            self.memo.remember_answer(outcome.text, outcome.token_ids)

    def _prepare_prompt(self, conversation: list[Message], control: CallControl, tally: _Tally) -> int:
        """Encode the images and evaluate the prompt, recording what it cost in `tally`; prompt positions."""
        plan = build_prompt(conversation, self.tokenize, self._specials, self.memo.answers)
        started = time.monotonic()
        try:
            runs = self._runs(plan, control, tally)
        finally:
            tally.image_encode_seconds = time.monotonic() - started - tally.restore_seconds
        tally.prompt_tokens = sum(len(run.keys()) for run in runs)
        tally.image_tokens = sum(len(r.keys()) + 1 for r in runs if isinstance(r, (ImageRun, ImageSpan)))
        started = time.monotonic()
        try:
            kept = self._evaluate(runs, control)[0]
        finally:
            tally.prompt_seconds = time.monotonic() - started
        tally.restored_tokens = min(tally.restored_tokens, kept)  # the same prompt again: its last is re-evaluated
        tally.reused_tokens = kept - tally.restored_tokens
        return tally.prompt_tokens

    def _runs(self, plan: PromptPlan, control: CallControl, tally: _Tally) -> list[Run]:
        """Token runs and encoded images in prompt order; counts the images encoded now in `tally`.

        Every image is prepared (or found in the cache) and the prompt checked against the context
        before the first one is encoded: a prompt that cannot fit costs no vision encoder time. Then
        the longest prefix is kept or restored from disk, and only the images after it are encoded.
        """
        staged = stage_images(plan, self.memo, self._options.max_image_size, control)
        check_prompt_fits(plan, staged, self._text.n_ctx)
        layout = [ImageSpan(staged[item.index].key, staged[item.index].n_positions) if isinstance(item, ImageSlot)
                  else TokenRun(tuple(item)) for item in plan.items]
        held = self._restore_longest_prefix(layout, tally)
        # Only the images after what the KV cache holds (kept or restored from disk) are encoded.
        needed = {item.index for item, start in zip(plan.items, _starts(layout), strict=True)
                  if isinstance(item, ImageSlot) and start >= held}
        if staged:
            control.report("image", 0, len(staged))
        embeddings = {}
        for index, image in enumerate(staged):
            control.check()  # before encoding: an encode cannot be interrupted once started
            if index in needed:
                embeddings[index] = self._encode(image, tally)
            control.report("image", index + 1, len(staged))
        return [ImageRun(run.key, embeddings[item.index])
                if isinstance(item, ImageSlot) and item.index in embeddings else run
                for item, run in zip(plan.items, layout, strict=True)]

    def _restore_longest_prefix(self, layout: list[Run], tally: _Tally) -> int:
        """Positions of the prompt the KV cache holds: what it keeps, or a longer prefix from the disk."""
        kept = self.kv.reusable_prefix(layout)
        if self.disk is None:
            return kept
        started = time.monotonic()
        keys = _keys(layout)
        cuts = _cut_points(layout)
        hit = self.disk.longest_prefix(keys, cuts.__contains__, longer_than=kept)
        if hit is None:
            return kept
        try:
            self.kv.restore(keys[:hit.positions], hit.state)
        except BackendError as exc:  # checked bytes that llama.cpp still refuses: evaluate instead
            log.warning("prompt cache: could not restore %d positions: %s", hit.positions, exc)
            return 0  # the KV cache is empty now
        tally.restored_tokens, tally.restore_seconds = hit.positions, time.monotonic() - started
        return hit.positions

    def _encode(self, image: StagedImage, tally: _Tally) -> ImageEmbedding:
        # Looked up again: the same image twice in one prompt is encoded once.
        embedding = image.embedding if image.embedding is not None else self.memo.embedding(image.key)
        if embedding is None:
            embedding = self._vision.encode_rgb(image.pixels)  # checks every value is finite
            self.memo.remember(image.key, embedding)
            tally.images_encoded += 1
            self.images_encoded += 1
        return embedding

    def _evaluate(self, runs: list[Run], control: CallControl) -> tuple[int, np.ndarray]:
        """Bring the KV cache to exactly `runs`, reusing the common prefix: (reused positions, last logits).

        Decoded one batch at a time so a cancel or a progress callback can stop between batches; the
        KV cache's keys then name what it holds (a partly decoded image is decoded again from its start).
        """
        keep = self.kv.reusable_prefix(runs)
        self.kv.trim(keep)
        pieces = _pieces(runs, keep, self._options.n_batch)
        stores = self._store_points(runs, keep)
        total, done = sum(stop - start for _, start, stop in pieces), 0
        control.report("prompt", 0, total)
        self._store_if_at(stores)
        logits = np.empty(0, np.float32)
        for run, start, stop in pieces:
            control.check()
            if isinstance(run, ImageRun):  # no logits: the prompt never ends with an image
                self.kv.append_embeddings(run.key, run.embedding.embeddings[start:stop])
            elif isinstance(run, TokenRun):
                logits = self.kv.append_tokens(run.tokens[start:stop])
            else:  # an ImageSpan lies before `keep`, always (see _runs)
                raise AssertionError(f"image {run.key} was not encoded")
            done += stop - start
            self._store_if_at(stores)
            control.report("prompt", done, total)
        return keep, logits

    def _store_points(self, runs: list[Run], keep: int) -> set[int]:
        """Prefix lengths of `runs` to store on disk: through the last image, and the whole prompt when
        this answer evaluates enough of it after that (DISK_CACHE_MIN_NEW_POSITIONS); never one already
        stored or that the KV cache has gone past."""
        if self.disk is None:
            return set()
        keys = _keys(runs)
        image_ends = [start + len(run.keys()) for run, start in zip(runs, _starts(runs), strict=True)
                      if isinstance(run, (ImageRun, ImageSpan))]
        last_image = max(image_ends, default=0)
        points = {last_image} if last_image else set()
        # Only positions this answer evaluates count: a chat's follow-up in this process reuses all but its
        # new turn, so storing the whole conversation again each turn would write hundreds of MB for seconds.
        if len(keys) - max(keep, last_image) >= DISK_CACHE_MIN_NEW_POSITIONS:
            points.add(len(keys))
        return {n for n in points if n >= keep and not self.disk.has(keys[:n])}

    def _store_if_at(self, points: set[int]) -> None:
        """Store the KV cache on disk if it now holds one of the prefixes in `points`."""
        if self.disk is None or len(self.kv.keys) not in points:
            return
        started = time.monotonic()
        try:
            keys, state = self.kv.snapshot()  # a copy: llama.cpp goes on while a thread writes it
        except BackendError as exc:
            log.warning("prompt cache: not storing %d positions: %s", len(self.kv.keys), exc)
            return
        log.debug("prompt cache: snapshot of %d positions, %d bytes, in %.3f s", len(keys), len(state),
                  time.monotonic() - started)
        self.disk.store(keys, state)

    def _tally(self) -> _Tally:
        return _Tally(text_layers_on_gpu=self._placement.text_layers_on_gpu,
                      vision_on_gpu=self._placement.vision_on_gpu)


@dataclass
class _Tally:
    """What one answer cost, filled in as it goes (a cancelled answer reports what it got to)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    image_tokens: int = 0
    images_encoded: int = 0
    image_encode_seconds: float = 0.0
    prompt_seconds: float = 0.0
    restored_tokens: int = 0
    restore_seconds: float = 0.0
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
            text_layers_on_gpu=self.text_layers_on_gpu, vision_on_gpu=self.vision_on_gpu,
            restored_tokens=self.restored_tokens, restore_seconds=self.restore_seconds)


def _pieces(runs: list[Run], keep: int, n_batch: int) -> list[Piece]:
    """The positions of `runs` after the first `keep`, in batches of at most `n_batch`."""
    pieces: list[Piece] = []
    position = 0
    for run in runs:
        length = len(run.keys())
        skip = max(keep - position, 0)  # never inside an image (see kv_cache.reusable_prefix)
        position += length
        pieces += [(run, start, min(start + n_batch, length)) for start in range(skip, length, n_batch)]
    return pieces


def open_disk_cache(files: Sequence[Path], options: ModelOptions, placement: Placement) -> DiskCache | None:
    """The prompt cache on disk of this pair and these settings, or None when `options` turn it off.

    Its identity holds every setting that changes the evaluated state: the KV cache's type, the image
    budget (the images' pixels), batch size and flash attention (the arithmetic), where layers run, the
    llama.cpp build. The context size and thread count are left out: they do not change a position's state.
    """
    if not options.disk_cache:
        return None
    settings = {"kv_cache_type": options.kv_cache_type, "max_image_size": options.max_image_size,
                "n_batch": options.n_batch, "flash_attn": options.flash_attn,
                "text_layers_on_gpu": placement.text_layers_on_gpu, "vision_on_gpu": placement.vision_on_gpu,
                "llama_cpp_python": importlib.metadata.version(LLAMA_PACKAGE)}
    folder = Path(options.disk_cache_dir).expanduser() if options.disk_cache_dir else default_prompt_cache_dir()
    try:
        identity = identity_digest(files, settings)
    except OSError as exc:  # the files were checked at load; a vanished one only costs the cache
        log.warning("prompt cache: off, cannot read the model files: %s", exc)
        return None
    return DiskCache(folder, identity, options.disk_cache_max_bytes)


def _keys(runs: Sequence[Run]) -> list[Key]:
    return [k for run in runs for k in run.keys()]


def _starts(runs: Sequence[Run]) -> list[int]:
    """The position each run starts at."""
    starts, position = [], 0
    for run in runs:
        starts.append(position)
        position += len(run.keys())
    return starts


def _cut_points(runs: Sequence[Run]) -> set[int]:
    """Prefix lengths of `runs` that do not end inside an image (a prefix holds an image whole or not at all)."""
    cuts, position = {0}, 0
    for run in runs:
        length = len(run.keys())
        if isinstance(run, TokenRun):
            cuts.update(range(position + 1, position + length + 1))
        else:
            cuts.add(position + length)
        position += length
    return cuts
