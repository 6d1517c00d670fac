"""The whole runtime against the whole reference: mistral-common's preprocessing and tokens fed to
transformers, versus pixtral-cpp's images, prompt and llama.cpp, on the same tiny random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pixtral_cpp.conversation import Image, Message, Text
from pixtral_cpp.images import prepare_image
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.synthetic.tekken import real_tekken_path
from tests.reference import IMG, IMG_BREAK, IMG_END, load_reference, normalize_pixels

EXACT = ModelOptions(n_ctx=8192, threads=2, kv_cache_type="f32", flash_attn="off")


@pytest.fixture(scope="module")
def pixtral(tiny_gguf_pair):
    text, mmproj, _ = tiny_gguf_pair
    with PixtralModel.load(text, mmproj, EXACT) as model:
        yield model


@pytest.fixture(scope="module")
def reference(tiny_gguf_pair):
    return load_reference(tiny_gguf_pair[2])


@pytest.fixture(scope="module")
def mistral_tokenizer():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(real_tekken_path()))


def photo_like(width: int, height: int, seed: int) -> PILImage.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)], -1)
    return PILImage.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def reference_logits(reference, mistral_tokenizer, image: PILImage.Image, question: str,
                     pixels: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """mistral-common encodes the request (tokens and normalised pixels); transformers runs it.

    With `pixels` (uint8, already at the grid size) those replace mistral-common's own pixels.
    """
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest(messages=[UserMessage(content=[ImageChunk(image=image),
                                                                   TextChunk(text=question)])])
    encoded = mistral_tokenizer.encode_chat_completion(request)
    values = torch.from_numpy(np.asarray(encoded.images[0], dtype=np.float32))[None]
    if pixels is not None:
        assert tuple(values.shape[-2:]) == pixels.shape[:2]
        values = normalize_pixels(pixels)
    with torch.no_grad():
        out = reference(input_ids=torch.tensor([encoded.tokens]), pixel_values=values,
                        image_sizes=torch.tensor([values.shape[-2:]]))
    image_positions = sum(t in (IMG, IMG_BREAK, IMG_END) for t in encoded.tokens)
    return out.logits[0, -1].float().numpy(), image_positions


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


# Multiples of 16, not multiples of 16, wider than 1024 px, and an extreme aspect ratio.
SIZES = [(64, 48), (100, 70), (1300, 500), (33, 700)]


@pytest.mark.parametrize("width,height", SIZES)
def test_image_prompt_logits_match_the_reference(pixtral, reference, mistral_tokenizer, width, height):
    image = photo_like(width, height, seed=width)
    question = "What is in this picture?"
    ours = pixtral.prompt_logits([Message("user", (Image(image), Text(question)))])
    stats = pixtral.describe(image, question, max_tokens=1, temperature=0).stats
    assert np.isfinite(ours).all()
    # Same pixels (ours): only llama.cpp's arithmetic differs, docs/runtime-notes.md §4's float32 image floor.
    same_pixels, positions = reference_logits(reference, mistral_tokenizer, image, question,
                                              prepare_image(image).pixels)
    assert stats.image_tokens == positions  # mistral-common's [IMG]/[IMG_BREAK]/[IMG_END] count
    assert relative_error(ours, same_pixels) < 1e-3
    assert int(ours.argmax()) == int(same_pixels.argmax())
    # mistral-common's own float pixels keep bicubic overshoot below 0 and above 255, which llama.cpp's
    # uint8 input cannot carry (tests/test_images.py bounds the pixel difference): a looser bound.
    full_reference, _ = reference_logits(reference, mistral_tokenizer, image, question)
    assert relative_error(ours, full_reference) < 1e-2
    assert int(ours.argmax()) == int(full_reference.argmax())


def test_forty_random_images_in_one_process_all_finite(pixtral):
    rng = np.random.default_rng(7)
    for i in range(40):
        width, height = (int(v) for v in rng.integers(16, 1201, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        logits = pixtral.prompt_logits([Message("user", (Image(pixels), Text("Describe.")))])
        assert np.isfinite(logits).all(), f"image {i} ({width}x{height}) gave non-finite logits"
