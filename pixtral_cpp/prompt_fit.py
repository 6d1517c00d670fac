"""Fitting a prompt into the context before any image is encoded.

The vision encoder is the slow part of a prompt (minutes per image on a CPU at 12B), but an image's
positions follow from its size alone. So every image of a prompt is first found in the cache or
prepared (decoded and resized, which is fast), the prompt's positions are counted and checked against
the context, and only then are the new images encoded. The prepared pixels of one prompt's images are
held meanwhile: a few MB each (1024 x 1024 x 3 bytes at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pixtral_cpp.backend import ImageEmbedding
from pixtral_cpp.control import CallControl
from pixtral_cpp.conversation import PromptPlan
from pixtral_cpp.errors import ContextLengthError
from pixtral_cpp.images import ImageSource, prepare_image
from pixtral_cpp.prompt_cache import PromptCache, image_key, source_fingerprint


@dataclass(frozen=True, eq=False)
class StagedImage:
    """One image of a prompt, ready to be encoded or already encoded (found in the cache)."""

    key: str  # content hash of the prepared pixels (prompt_cache.image_key)
    n_positions: int  # context positions of its embedding, [IMG_END] excluded (as ImageEmbedding's)
    embedding: ImageEmbedding | None  # from the cache; None: still to encode
    pixels: np.ndarray | None = field(default=None, repr=False)  # (rows*16, cols*16, 3) uint8 when not cached


def stage_images(plan: PromptPlan, cache: PromptCache, max_image_size: int, control: CallControl
                 ) -> list[StagedImage]:
    """Each image of `plan`, in order, found in the cache or prepared; nothing is encoded here."""
    staged = []
    for image in plan.images:
        control.check()
        staged.append(_stage(image.source, cache, max_image_size))
    return staged


def _stage(source: ImageSource, cache: PromptCache, budget: int) -> StagedImage:
    fingerprint = source_fingerprint(source)
    known = cache.known_source(fingerprint, budget)
    if known is not None:  # a follow-up about the same file, bytes or array: not even decoded again
        key, embedding = known
        return StagedImage(key, embedding.n_positions, embedding)
    prepared = prepare_image(source, max_image_size=budget)
    key = image_key(prepared.pixels)
    cache.remember_source(fingerprint, budget, key)
    embedding = cache.embedding(key)
    if embedding is not None:  # the same pixels from another source
        return StagedImage(key, embedding.n_positions, embedding)
    # rows * (cols + 1) positions, the last of which is the [IMG_END] token that follows the embedding
    return StagedImage(key, prepared.geometry.n_image_positions - 1, None, prepared.pixels)


def check_prompt_fits(plan: PromptPlan, staged: Sequence[StagedImage], n_ctx: int) -> int:
    """The prompt's positions; ContextLengthError when they leave no room to answer."""
    image_positions = [image.n_positions for image in staged]
    n_prompt = plan.n_positions(image_positions)
    if n_prompt >= n_ctx:
        raise ContextLengthError(
            f"the prompt needs {n_prompt} positions ({sum(image_positions)} for images) but the context holds "
            f"{n_ctx}; raise the context size (--ctx), lower the image budget (--max-image-size) "
            f"or ask about fewer images")
    return n_prompt
