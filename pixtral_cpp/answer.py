"""One answer on a loaded pair: stage and encode the images, bring the prompt into the KV cache, generate.

The caller (PixtralModel) holds the model's lock around every method here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pixtral_cpp.backend import ImageEmbedding, TextModel, VisionContext, json_schema_grammar
from pixtral_cpp.control import CallControl, GenerationCancelled
from pixtral_cpp.conversation import ImageSlot, Message, PromptPlan, SpecialTokens, build_prompt
from pixtral_cpp.generate import Outcome, generate_tokens
from pixtral_cpp.kv_cache import ImageRun, KVCache, Run, TokenRun
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.placement import Placement
from pixtral_cpp.prompt_cache import PromptCache
from pixtral_cpp.prompt_fit import StagedImage, check_prompt_fits, stage_images
from pixtral_cpp.results import Chunk, FinishReason, GenerationStats
from pixtral_cpp.tekken_tokenizer import prompt_tokenizer

Piece = tuple[Run, int, int]  # one batch: positions start:stop of a run


class Answerer:
    """The conversation state of a text model and its vision encoder: KV cache and memo tables."""

    def __init__(self, text: TextModel, vision: VisionContext, options: ModelOptions, placement: Placement
                 ) -> None:
        self._text, self._vision = text, vision
        self._options, self._placement = options, placement
        self._specials = SpecialTokens.from_model(text)
        self._tokenize = prompt_tokenizer(text)  # tekken's own rule, not llama.cpp's (tekken_tokenizer.py)
        self.kv = KVCache(text)
        self.memo = PromptCache(options.image_cache_size)
        self.images_encoded = 0  # over the model's lifetime; follow-up questions should not add to it

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
            tally.image_encode_seconds = time.monotonic() - started
        tally.prompt_tokens = sum(len(run.keys()) for run in runs)
        tally.image_tokens = sum(r.embedding.n_positions + 1 for r in runs if isinstance(r, ImageRun))
        started = time.monotonic()
        try:
            tally.reused_tokens = self._evaluate(runs, control)[0]
        finally:
            tally.prompt_seconds = time.monotonic() - started
        return tally.prompt_tokens

    def _runs(self, plan: PromptPlan, control: CallControl, tally: _Tally) -> list[Run]:
        """Token runs and encoded images in prompt order; counts the images encoded now in `tally`.

        Every image is prepared (or found in the cache) and the prompt checked against the context
        before the first one is encoded: a prompt that cannot fit costs no vision encoder time.
        """
        staged = stage_images(plan, self.memo, self._options.max_image_size, control)
        check_prompt_fits(plan, staged, self._text.n_ctx)
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
        total, done = sum(stop - start for _, start, stop in pieces), 0
        control.report("prompt", 0, total)
        logits = np.empty(0, np.float32)
        for run, start, stop in pieces:
            control.check()
            if isinstance(run, ImageRun):  # no logits: the prompt never ends with an image
                self.kv.append_embeddings(run.key, run.embedding.embeddings[start:stop])
            else:
                logits = self.kv.append_tokens(run.tokens[start:stop])
            done += stop - start
            control.report("prompt", done, total)
        return keep, logits

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
        length = len(run.keys())
        skip = max(keep - position, 0)  # never inside an image (see kv_cache.reusable_prefix)
        position += length
        pieces += [(run, start, min(start + n_batch, length)) for start in range(skip, length, n_batch)]
    return pieces
