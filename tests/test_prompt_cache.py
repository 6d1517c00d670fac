"""What a follow-up turn may keep of the KV cache: the rules of PromptCache.reusable_prefix."""

from __future__ import annotations

import numpy as np

from pixtral_cpp.backend import ImageEmbedding
from pixtral_cpp.prompt_cache import ImageRun, PromptCache, TokenRun


def image(key: str, rows: int = 2, cols: int = 2) -> ImageRun:
    positions = rows * (cols + 1) - 1
    return ImageRun(key, ImageEmbedding(np.zeros((positions, 4), np.float32), rows, cols))


def cache_holding(*runs) -> PromptCache:
    cache = PromptCache(image_capacity=4)
    cache.keys = [k for run in runs for k in run.keys()]
    return cache


PROMPT = [TokenRun((1, 3)), image("a"), TokenRun((13, 50, 51, 4))]  # <s>[INST] image [IMG_END] text [/INST]


def test_a_follow_up_keeps_the_whole_previous_turn():
    follow_up = [*PROMPT, TokenRun((60, 61, 2, 3, 70, 4))]  # answer, </s>, [INST] question [/INST]
    assert cache_holding(*PROMPT).reusable_prefix(follow_up) == 2 + 5 + 4


def test_the_same_prompt_again_re_evaluates_only_its_last_position():
    assert cache_holding(*PROMPT).reusable_prefix(PROMPT) == 2 + 5 + 4 - 1


def test_half_an_image_in_the_cache_is_decoded_again_from_its_start():
    cache = cache_holding(*PROMPT)
    cache.keys = cache.keys[:4]  # <s>[INST] and two of the image's five positions
    assert cache.reusable_prefix(PROMPT) == 2


def test_another_image_keeps_only_what_comes_before_it():
    other = [TokenRun((1, 3)), image("b"), TokenRun((13, 50, 51, 4))]
    assert cache_holding(*PROMPT).reusable_prefix(other) == 2


def test_a_changed_question_after_the_image_keeps_the_image():
    changed = [TokenRun((1, 3)), image("a"), TokenRun((13, 99, 4))]
    assert cache_holding(*PROMPT).reusable_prefix(changed) == 2 + 5 + 1


def test_an_empty_cache_keeps_nothing():
    assert PromptCache(image_capacity=1).reusable_prefix(PROMPT) == 0


def test_encoded_images_are_evicted_oldest_first():
    cache = PromptCache(image_capacity=2)
    for key in "abc":
        cache.remember(key, image(key).embedding)
    assert cache.embedding("a") is None and cache.embedding("c") is not None


def test_source_fingerprints(tmp_path):
    import os

    from PIL import Image as PILImage

    from pixtral_cpp.prompt_cache import source_fingerprint

    path = tmp_path / "a.png"
    PILImage.new("RGB", (8, 8), "red").save(path)
    first = source_fingerprint(path)
    assert first == source_fingerprint(str(path))
    PILImage.new("RGB", (8, 8), "blue").save(path)
    os.utime(path, ns=(1, 1))  # a rewrite with another time: the fingerprint must change
    assert source_fingerprint(path) != first
    pixels = np.zeros((4, 4, 3), np.uint8)
    assert source_fingerprint(pixels) == source_fingerprint(pixels.copy())
    assert source_fingerprint(pixels) != source_fingerprint(pixels + 1)
    assert source_fingerprint(b"abc") != source_fingerprint(b"abd")
    assert source_fingerprint(PILImage.new("RGB", (2, 2))) is None
    assert source_fingerprint(tmp_path / "missing.png") is None
