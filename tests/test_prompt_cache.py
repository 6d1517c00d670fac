"""What a follow-up turn may keep of the KV cache (kv_cache.reusable_prefix), and the memo tables."""

from __future__ import annotations

import numpy as np

from pixtral_cpp.backend import ImageEmbedding
from pixtral_cpp.kv_cache import ImageRun, Key, TokenRun, reusable_prefix
from pixtral_cpp.prompt_cache import PromptCache, RecentTable


def image(key: str, rows: int = 2, cols: int = 2) -> ImageRun:
    positions = rows * (cols + 1) - 1
    return ImageRun(key, ImageEmbedding(np.zeros((positions, 4), np.float32), rows, cols))


def cache_holding(*runs) -> list[Key]:
    """The keys of a KV cache that holds `runs`."""
    return [k for run in runs for k in run.keys()]


PROMPT = [TokenRun((1, 3)), image("a"), TokenRun((13, 50, 51, 4))]  # <s>[INST] image [IMG_END] text [/INST]


def test_a_follow_up_keeps_the_whole_previous_turn():
    follow_up = [*PROMPT, TokenRun((60, 61, 2, 3, 70, 4))]  # answer, </s>, [INST] question [/INST]
    assert reusable_prefix(cache_holding(*PROMPT), follow_up) == 2 + 5 + 4


def test_the_same_prompt_again_re_evaluates_only_its_last_position():
    assert reusable_prefix(cache_holding(*PROMPT), PROMPT) == 2 + 5 + 4 - 1


def test_half_an_image_in_the_cache_is_decoded_again_from_its_start():
    keys = cache_holding(*PROMPT)[:4]  # <s>[INST] and two of the image's five positions
    assert reusable_prefix(keys, PROMPT) == 2


def test_another_image_keeps_only_what_comes_before_it():
    other = [TokenRun((1, 3)), image("b"), TokenRun((13, 50, 51, 4))]
    assert reusable_prefix(cache_holding(*PROMPT), other) == 2


def test_a_changed_question_after_the_image_keeps_the_image():
    changed = [TokenRun((1, 3)), image("a"), TokenRun((13, 99, 4))]
    assert reusable_prefix(cache_holding(*PROMPT), changed) == 2 + 5 + 1


def test_an_empty_cache_keeps_nothing():
    assert reusable_prefix([], PROMPT) == 0


def test_encoded_images_are_evicted_oldest_first():
    cache = PromptCache(image_capacity=2)
    for key in "abc":
        cache.remember(key, image(key).embedding)
    assert cache.embedding("a") is None and cache.embedding("c") is not None


def test_a_recent_table_drops_the_least_recently_used():
    table: RecentTable[str, int] = RecentTable(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.get("a") == 1  # a lookup makes "a" the most recent
    table.put("c", 3)
    assert list(table) == ["a", "c"] and table.get("b") is None
    table.put("a", 4)  # a put of a known key refreshes it too, without growing the table
    table.put("d", 5)
    assert list(table) == ["a", "d"] and table["a"] == 4


def test_a_recent_table_of_capacity_zero_keeps_nothing():
    table: RecentTable[str, int] = RecentTable(0)
    table.put("a", 1)
    assert len(table) == 0 and "a" not in table


def test_every_memo_table_is_bounded():
    cache = PromptCache(image_capacity=1)
    for n in range(40):
        cache.remember(f"img:{n}", image("x").embedding)
        cache.remember_source(f"path:{n}", 1024, f"img:{n}")
        cache.remember_answer(f"answer {n}", (n,))
    assert cache.embedding("img:38") is None and cache.embedding("img:39") is not None
    assert cache.known_source("path:39", 1024) is not None and cache.known_source("path:35", 1024) is None
    assert len(cache.answers) == 16 and "answer 23" not in cache.answers and cache.answers["answer 39"] == (39,)


def test_a_source_is_known_only_at_its_image_budget():
    cache = PromptCache(image_capacity=2)
    cache.remember("img:a", image("a").embedding)
    cache.remember_source("path:a", 1024, "img:a")
    assert cache.known_source("path:a", 1024) is not None
    assert cache.known_source("path:a", 512) is None and cache.known_source(None, 1024) is None


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
