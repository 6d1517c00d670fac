"""Converted files against transformers on the same random weights, per output type.

Tolerances are docs/runtime-notes.md §4's measured figures with headroom: max |diff| over max |logit|.
"""

from __future__ import annotations

import numpy as np
import pytest

from pixtral_cpp.backend.text import TextModel, TextModelOptions
from pixtral_cpp.backend.vision import VisionContext
from tests.llama_reference import prompt_logits
from tests.reference import load_reference, segments_reference_logits

# [INST]…[/INST] around a few words; ids from the real tekken (1 <s>, 3 [INST], 4 [/INST]).
TEXT_PROMPT = [1, 3, 1049, 3263, 1278, 4209, 1307, 1278, 4745, 1046, 4]
EXACT = TextModelOptions(n_ctx=2048, kv_cache_type="f32", flash_attn="off", n_threads=2)
# F32 images have a floor of 1e-4..4e-4 from llama.cpp's F16 im2col and tabulated GELU (docs/runtime-notes.md §4).
TOLERANCE = {"F32": {"text": 1e-5, "image": 1e-3}, "F16": 3e-3, "BF16": 1.2e-2, "Q8_0": 5e-2}


@pytest.fixture(scope="module")
def reference(tiny_hf):
    return load_reference(tiny_hf)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: closer to a photo than white noise
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


PROMPTS = {
    "text": [TEXT_PROMPT],
    "image": [[1, 3], _image(64, 96, 0), [1049, 3263, 4]],
}


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("quant", list(TOLERANCE))
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_logits_match_transformers(converted, reference, quant, kind):
    text_path, mmproj_path = converted(quant, quant)
    expected = segments_reference_logits(reference, PROMPTS[kind])
    with TextModel(text_path, EXACT) as model, \
            VisionContext(mmproj_path, model, threads=2, flash_attn="off") as vision:
        ours = prompt_logits(model, vision, PROMPTS[kind])
    assert np.isfinite(ours).all()
    tolerance = TOLERANCE[quant]
    assert _relative_error(ours, expected) < (tolerance[kind] if isinstance(tolerance, dict) else tolerance)
    assert int(ours.argmax()) == int(expected.argmax())


def test_k_quant_keeps_the_argmax_where_the_margin_is_large(converted, reference):
    """Q4_K_M is lossy: teacher-forced over 256 positions, the argmax must hold wherever the
    reference's top token leads the runner-up by more than half a standard deviation of its logits."""
    import torch

    rng = np.random.default_rng(0)
    tokens = [1, 3, *(int(t) for t in rng.integers(1000, 20000, 254))]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([tokens])).logits[0].float().numpy()
    with TextModel(converted("Q4_K_M")[0], EXACT) as model:
        ours = model.eval_tokens(tokens, all_logits=True)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) / expected.std(axis=1) > 0.5
    assert clear.sum() >= 10, "too few positions with a clear top token; the test would prove nothing"
    np.testing.assert_array_equal(ours[clear].argmax(axis=1), expected[clear].argmax(axis=1))
    assert np.corrcoef(ours.ravel(), expected.ravel())[0, 1] > 0.98
