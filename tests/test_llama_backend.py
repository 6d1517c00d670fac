"""The llama.cpp backend against transformers on a tiny random Pixtral: logits, images, quantization, logs."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from pixtral_cpp.backend import TextModel, TextModelOptions, VisionContext, bindings, set_verbose
from pixtral_cpp.errors import BackendError, ImageError, ModelError, QuantizationError
from tests import reference as ref
from tests.llama_reference import LLAMA_FTYPES, prompt_logits, quantize_gguf

PROMPT = "[INST]Describe the picture in one word.[/INST]"
EXACT = TextModelOptions(n_ctx=4608, n_batch=512, n_threads=2, kv_cache_type="f32", flash_attn="off")


@pytest.fixture(scope="module")
def text_model(tiny_gguf_pair):
    with TextModel(tiny_gguf_pair[0], EXACT) as model:
        yield model


@pytest.fixture(scope="module")
def vision(tiny_gguf_pair, text_model):
    with VisionContext(tiny_gguf_pair[1], text_model, threads=2, flash_attn="off") as ctx:
        yield ctx


@pytest.fixture(scope="module")
def reference_model(tiny_gguf_pair):
    return ref.load_reference(tiny_gguf_pair[2])


def random_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    """Max abs difference relative to the largest reference logit, and the same arg-max."""
    assert np.isfinite(actual).all()
    diff = float(np.abs(actual - expected).max() / np.abs(expected).max())
    assert diff <= rel, f"relative logit difference {diff:.2e} > {rel:.0e}"
    assert actual.argmax() == expected.argmax()


def pixtral_size(width: int, height: int) -> tuple[int, int]:
    """mistral-common's target size: longest edge at most 1024 px, sides rounded up to 16."""
    ratio = max(width, height) / 1024
    if ratio > 1:
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    return 16 * math.ceil(width / 16), 16 * math.ceil(height / 16)


# -- text ------------------------------------------------------------------------------------------------


def test_text_logits_match_transformers(text_model, reference_model):
    ids = text_model.tokenize(PROMPT, add_special=True, parse_special=True)
    logits = prompt_logits(text_model, None, [ids])
    assert_logits_close(logits, ref.reference_logits(reference_model, ids), rel=1e-5)  # measured 5.8e-7


def test_tokenizer_special_tokens_and_round_trip(text_model):
    ids = text_model.tokenize(PROMPT, add_special=True, parse_special=True)
    assert ids[:2] == [1, 3] and ids[-1] == 4
    assert text_model.token_id("[IMG_END]") == ref.IMG_END
    assert text_model.detokenize(ids, render_special=True) == "<s>" + PROMPT
    assert text_model.detokenize(ids) == "Describe the picture in one word."


def test_all_logits_and_trim_reuse_the_cache(text_model):
    ids = text_model.tokenize(PROMPT, add_special=True, parse_special=True)
    text_model.clear()
    every = text_model.eval_tokens(ids, all_logits=True)
    assert every.shape == (len(ids), text_model.n_vocab) and text_model.n_past == len(ids)
    text_model.trim(3)
    assert text_model.n_past == 3
    last = text_model.eval_tokens(ids[3:])
    np.testing.assert_allclose(last, every[-1], rtol=0, atol=1e-4)


def test_context_overflow_is_an_error(text_model):
    text_model.clear()
    with pytest.raises(BackendError, match="raise n_ctx"):
        text_model.eval_tokens([1] * (text_model.n_ctx + 1))


def test_loading_a_non_gguf_is_a_model_error(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="not a GGUF"):
        TextModel(bogus)


# -- images -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height", [(64, 48), (160, 96), pytest.param(1024, 768, marks=pytest.mark.slow)]
)
def test_image_logits_match_transformers(text_model, vision, reference_model, width, height):
    image = random_image(np.random.default_rng(width), width, height)
    rest = text_model.tokenize("Describe[/INST]", add_special=False, parse_special=True)
    segments = [[1, 3], image, rest]
    logits = prompt_logits(text_model, vision, segments)
    rows, cols = height // 16, width // 16
    # one position per patch, per [IMG_BREAK] and for [IMG_END]
    assert text_model.n_past == 2 + rows * (cols + 1) + len(rest)
    expected = ref.segments_reference_logits(reference_model, segments)
    assert_logits_close(logits, expected, rel=1e-3)  # measured 1.3e-4 .. 4.2e-4


def test_image_embedding_layout(vision):
    embedding = vision.encode_rgb(random_image(np.random.default_rng(1), 80, 48))
    assert (embedding.rows, embedding.cols) == (3, 5)
    assert embedding.n_positions == 3 * (5 + 1) - 1
    assert embedding.embeddings.dtype == np.float32
    breaks = embedding.embeddings[5::6]
    assert len(breaks) == 2 and np.array_equal(breaks[0], breaks[1])


@pytest.mark.parametrize(
    "pixels, message",
    [
        (np.zeros((50, 64, 3), np.uint8), "multiples of 16"),
        (np.zeros((48, 64, 3), np.float32), "uint8"),
        (np.zeros((48, 64), np.uint8), "uint8"),
        (np.zeros((1040, 1040, 3), np.uint8), "4225 patches"),
    ],
)
def test_unusable_images_are_image_errors(vision, pixels, message):
    with pytest.raises(ImageError, match=message):
        vision.encode_rgb(pixels)


@pytest.mark.slow
def test_forty_random_images_give_finite_logits(text_model, vision):
    # libmtmd's [IMG_BREAK] rows can hold NaN from a reused buffer (docs/runtime-notes.md §1).
    rng = np.random.default_rng(40)
    for _ in range(40):
        width, height = pixtral_size(*rng.integers(16, 1201, 2))
        image = random_image(rng, width, height)
        embedding = vision.encode_rgb(image)
        assert np.isfinite(embedding.embeddings).all()
        assert np.isfinite(prompt_logits(text_model, vision, [[1, 3], image, [4]])).all()


def test_closing_the_text_model_closes_its_vision_context(tiny_gguf_pair):
    text = TextModel(tiny_gguf_pair[0], TextModelOptions(n_ctx=256))
    vision = VisionContext(tiny_gguf_pair[1], text)
    text.close()
    with pytest.raises(BackendError, match="closed"):
        vision.encode_rgb(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(BackendError, match="closed"):
        text.eval_tokens([1])
    vision.close()  # idempotent


# -- quantization -------------------------------------------------------------------------------------------


def test_ftype_table_matches_the_bindings():
    llama_cpp, _ = bindings()  # llama_cpp.llama_cpp, where the package's LLAMA_FTYPE_* constants come from
    for name, value in LLAMA_FTYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == value, name


@pytest.mark.slow
def test_quantize_q4_k_m_loads_and_runs(tiny_gguf_pair, tmp_path):
    text_src, mmproj_src, _ = tiny_gguf_pair
    seen: list[tuple[int, int, str]] = []
    text_dst, mmproj_dst = tmp_path / "text-q4_k_m.gguf", tmp_path / "mmproj-q4_k_m.gguf"
    quantize_gguf(text_src, text_dst, LLAMA_FTYPES["Q4_K_M"], threads=2, on_tensor=lambda *a: seen.append(a))
    quantize_gguf(mmproj_src, mmproj_dst, LLAMA_FTYPES["Q4_K_M"], threads=2)
    # (GGUFReader parses the 400k tokenizer strings in Python: too slow to use here)
    n_tensors = seen[0][1]
    assert [i for i, _, _ in seen] == list(range(1, n_tensors + 1))
    assert len({name for *_, name in seen}) == n_tensors and "token_embd.weight" in {name for *_, name in seen}
    assert text_dst.stat().st_size < text_src.stat().st_size / 4  # 4.5-6.5 bits per weight instead of 32
    # default repack_weights=False: no AMX repacking, whose matmul segfaults (llama.cpp#20824)
    options = TextModelOptions(n_ctx=512)
    with TextModel(text_dst, options) as text, VisionContext(mmproj_dst, text) as vision:
        image = random_image(np.random.default_rng(2), 64, 48)
        assert np.isfinite(prompt_logits(text, vision, [[1, 3], image, [4]])).all()


def test_quantizing_a_non_gguf_is_a_quantization_error(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"\x00" * 64)
    with pytest.raises(QuantizationError, match="not a GGUF"):
        quantize_gguf(src, tmp_path / "out.gguf", LLAMA_FTYPES["Q8_0"], threads=1)


def test_quantizing_a_truncated_gguf_is_a_quantization_error(tiny_gguf_pair, tmp_path):
    src = tmp_path / "truncated.gguf"
    src.write_bytes(tiny_gguf_pair[1].read_bytes()[:4096])
    dst = tmp_path / "out.gguf"
    with pytest.raises(QuantizationError, match="failed"):
        quantize_gguf(src, dst, LLAMA_FTYPES["Q8_0"], threads=1)
    assert not dst.exists()


def test_unknown_ftype_is_a_quantization_error(tiny_gguf_pair, tmp_path):
    with pytest.raises(QuantizationError, match="unknown llama_ftype 999"):
        quantize_gguf(tiny_gguf_pair[0], tmp_path / "out.gguf", 999, threads=1)


# -- logging ---------------------------------------------------------------------------------------------------


def test_quiet_by_default(tiny_gguf_pair, capfd):
    capfd.readouterr()
    with TextModel(tiny_gguf_pair[0], TextModelOptions(n_ctx=256)) as text:
        with VisionContext(tiny_gguf_pair[1], text) as vision:
            prompt_logits(text, vision, [[1, 3], np.zeros((32, 32, 3), np.uint8), [4]])
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_verbose_forwards_to_logging(tiny_gguf_pair, caplog, capfd):
    set_verbose(True)
    try:
        with caplog.at_level(logging.DEBUG, logger="pixtral_cpp.llama"):
            TextModel(tiny_gguf_pair[0], TextModelOptions(n_ctx=256)).close()
    finally:
        set_verbose(False)
    assert any("llama" in r.getMessage() for r in caplog.records if r.name == "pixtral_cpp.llama")
    assert capfd.readouterr() == ("", "")
