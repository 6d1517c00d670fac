"""KVCache on the real tiny model: its keys name exactly what llama.cpp's KV cache holds, a failure
empties both, a trim keeps exactly the prefix, and a half-evaluated image is evaluated again whole."""

from __future__ import annotations

import numpy as np
import pytest

from pixtral_cpp.backend import ImageEmbedding, TextModel, TextModelOptions
from pixtral_cpp.control import CancelToken
from pixtral_cpp.errors import BackendError, ModelError
from pixtral_cpp.kv_cache import ImageRun, KVCache, TokenRun
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import ModelOptions

EXACT = TextModelOptions(n_ctx=512, n_batch=64, n_threads=2, kv_cache_type="f32", flash_attn="off")
# n_batch 16: a 64x64 picture (19 positions, [IMG_END] after them) is evaluated in two batches.
SMALL = ModelOptions(n_ctx=512, threads=2, n_batch=16, kv_cache_type="f32", flash_attn="off")
PROMPT = [1, 3, 50, 51, 52, 53, 4]  # <s>[INST] four text tokens [/INST]


@pytest.fixture(scope="module")
def text(pair):
    with TextModel(pair[0], EXACT) as model:
        yield model


@pytest.fixture
def kv(text):
    cache = KVCache(text)
    cache.forget()  # each test starts from an empty KV cache
    return cache


def picture(seed: int, width: int = 64, height: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_mirrors(kv: KVCache, text: TextModel, keys: list) -> None:
    """The invariant: the keys are exactly the positions llama.cpp holds."""
    assert kv.keys == tuple(keys)
    assert text.n_past == len(keys)


def fresh_logits(kv: KVCache, tokens: list[int]) -> np.ndarray:
    """The logits of `tokens` evaluated into an emptied KV cache."""
    kv.forget()
    return kv.append_tokens(tokens)


def test_appending_tokens_and_image_rows_records_each_position(kv, text):
    rows = np.random.default_rng(0).standard_normal((5, text.n_embd)).astype(np.float32)
    kv.append_tokens([1, 3])
    kv.append_embeddings("img:a", rows)
    logits = kv.append_tokens([13, 4])
    assert_mirrors(kv, text, [1, 3, *["img:a"] * 5, 13, 4])
    assert logits.shape == (text.n_vocab,) and np.isfinite(logits).all()


@pytest.mark.parametrize("bad_append", [
    pytest.param(lambda kv, text: kv.append_embeddings("img:a", np.zeros((3, text.n_embd + 1), np.float32)),
                 id="embedding rows of the wrong width"),
    pytest.param(lambda kv, text: kv.append_tokens([5, text.n_vocab]), id="a token id out of range"),
    pytest.param(lambda kv, text: kv.append_tokens([5] * text.n_ctx), id="more positions than the context"),
    pytest.param(lambda kv, text: kv.append_embeddings("img:a", np.full((3, text.n_embd), np.nan, np.float32))
                 or kv.append_tokens([5]), id="NaN rows: llama.cpp decodes, then the logits are refused"),
])
def test_a_failed_append_forgets_the_kv_cache_and_its_keys(kv, text, bad_append):
    expected = fresh_logits(kv, PROMPT)
    kv.forget()
    kv.append_tokens(PROMPT[:3])
    with pytest.raises((ModelError, BackendError)):
        bad_append(kv, text)
    assert_mirrors(kv, text, [])  # llama.cpp's KV cache is emptied too, not only the keys
    np.testing.assert_allclose(kv.append_tokens(PROMPT), expected, rtol=0, atol=1e-5)
    assert_mirrors(kv, text, PROMPT)


def test_an_interrupt_during_an_append_forgets_too(kv, text):
    class Interrupting(list):
        """Tokens whose conversion is interrupted, like Ctrl-C arriving during the call."""

        def __array__(self, *args, **kwargs):
            raise KeyboardInterrupt

    kv.append_tokens(PROMPT)
    with pytest.raises(KeyboardInterrupt):
        kv.append_tokens(Interrupting([5, 6]))
    assert_mirrors(kv, text, [])


def test_trim_keeps_exactly_the_prefix_and_the_next_logits_equal_a_fresh_evaluation(kv, text):
    kv.append_tokens([*PROMPT, 60, 61, 62])
    kv.trim(4)
    assert_mirrors(kv, text, PROMPT[:4])
    logits = kv.append_tokens([70, 71, 4])
    np.testing.assert_allclose(logits, fresh_logits(kv, [*PROMPT[:4], 70, 71, 4]), rtol=0, atol=1e-5)


def test_trim_to_every_length_and_beyond(kv, text):
    kv.append_tokens(PROMPT)
    kv.trim(len(PROMPT))  # keeping everything is allowed
    assert_mirrors(kv, text, PROMPT)
    for bad in (len(PROMPT) + 1, -1):
        with pytest.raises(ValueError, match=f"cannot keep {bad} of the {len(PROMPT)} positions"):
            kv.trim(bad)
        assert_mirrors(kv, text, PROMPT)  # a refused trim changes nothing
    kv.trim(0)
    assert_mirrors(kv, text, [])


def test_keys_are_a_read_only_view(kv, text):
    kv.append_tokens([1, 3])
    with pytest.raises(AttributeError):
        kv.keys = ()  # type: ignore[misc]
    assert isinstance(kv.keys, tuple)  # immutable: the mirror cannot be changed through it
    assert_mirrors(kv, text, [1, 3])


def test_the_reusable_prefix_of_a_half_evaluated_image_stops_at_its_start(kv, text):
    embedding = ImageEmbedding(np.random.default_rng(1).standard_normal((11, text.n_embd)).astype(np.float32), 3, 3)
    runs = [TokenRun((1, 3)), ImageRun("img:a", embedding), TokenRun((13, 50, 4))]
    kv.append_tokens([1, 3])
    kv.append_embeddings("img:a", embedding.embeddings[:6])
    assert kv.reusable_prefix(runs) == 2
    kv.append_embeddings("img:a", embedding.embeddings[6:])
    kv.append_tokens([13, 50, 4])
    assert kv.reusable_prefix(runs) == 2 + 11 + 2  # all but the last position


# -- through PixtralModel ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixtral(pair):
    with PixtralModel.load(pair[0], options=SMALL) as model:
        yield model


def assert_half_an_image(model: PixtralModel) -> None:
    """The KV cache ends inside the image that follows <s>[INST] (its 19 positions take two batches)."""
    keys = model._answerer.kv.keys
    assert keys[:2] == (1, 3) and str(keys[-1]).startswith("img:") and 2 < len(keys) < 2 + 19
    assert model._text.n_past == len(keys)


def fresh_answer(pair, image: np.ndarray) -> str:
    with PixtralModel.load(pair[0], options=SMALL) as model:
        return model.describe(image, "What is this?", max_tokens=6, temperature=0).text


def test_a_prompt_cancelled_inside_an_image_evaluates_the_image_again_whole(pixtral, pair):
    image = picture(1)
    cancel = CancelToken()

    def cancel_inside_the_image(event) -> None:
        if event.stage == "prompt" and event.done > 2:  # past <s>[INST], one batch into the image
            cancel.cancel()

    stopped = pixtral.describe(image, "What is this?", max_tokens=6, cancel=cancel,
                               on_progress=cancel_inside_the_image)
    assert stopped.stats.finish_reason == "cancelled"
    assert_half_an_image(pixtral)
    again = pixtral.describe(image, "What is this?", max_tokens=6, temperature=0)
    assert again.stats.reused_tokens == 2  # <s>[INST]: the image's first rows are not reused
    assert again.text == fresh_answer(pair, image)


def test_after_a_failed_decode_the_next_answer_equals_a_fresh_models(pixtral, pair):
    image = picture(2)
    pixtral.describe(image, "What is this?", max_tokens=6, temperature=0)
    kv = pixtral._answerer.kv
    with pytest.raises(ModelError, match="outside the vocabulary|must be in"):
        kv.append_tokens([pixtral._text.n_vocab])
    assert kv.keys == () and pixtral._text.n_past == 0
    again = pixtral.describe(image, "What is this?", max_tokens=6, temperature=0)
    assert again.stats.reused_tokens == 0
    assert again.text == fresh_answer(pair, image)


def test_a_progress_callback_that_raises_mid_prompt_leaves_the_keys_true(pixtral, pair):
    image = picture(3)

    def fail_inside_the_image(event) -> None:
        if event.stage == "prompt" and event.done > 2:  # past <s>[INST], one batch into the image
            raise RuntimeError("the caller gave up")

    with pytest.raises(RuntimeError, match="the caller gave up"):
        pixtral.describe(image, "What is this?", max_tokens=6, on_progress=fail_inside_the_image)
    assert_half_an_image(pixtral)  # the batch evaluated before the callback raised is kept
    again = pixtral.describe(image, "What is this?", max_tokens=6, temperature=0)
    assert again.stats.reused_tokens == 2
    assert again.text == fresh_answer(pair, image)
