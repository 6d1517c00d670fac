"""transformers reference for Pixtral checkpoints in transformers layout, for parity tests.

Prompts are given as segments, the same ones ``pixtral_cpp.backend.prompt_logits`` takes: token lists
and RGB uint8 images whose sides are multiples of 16. Images become mistral-common's token layout:
rows of ``cols`` [IMG] tokens each followed by [IMG_BREAK], the last row by [IMG_END].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

IMG, IMG_BREAK, IMG_END = 10, 12, 13  # mistral-common's tekken v3 ids (docs/gguf-layout.md §5.1)
PATCH = 16
# CLIP normalisation, as written to the mmproj and applied by libmtmd (clip.vision.image_mean/std).
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

Segment = Sequence[int] | np.ndarray


def load_reference(hf_dir: Path):  # -> LlavaForConditionalGeneration
    """The checkpoint as a float32, eval-mode LlavaForConditionalGeneration with eager attention."""
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def image_token_ids(rows: int, cols: int) -> list[int]:
    """mistral-common's tokens for an image of rows x cols patches (rows * (cols + 1) ids)."""
    ids = ([IMG] * cols + [IMG_BREAK]) * rows
    ids[-1] = IMG_END
    return ids


def normalize_pixels(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32: x / 255, then (x - mean) / std per channel, like libmtmd."""
    x = (pixels.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def build_inputs(segments: Sequence[Segment]) -> tuple[list[int], list[np.ndarray]]:
    """Input ids with each image expanded to its [IMG] layout, and the images in order."""
    ids: list[int] = []
    images: list[np.ndarray] = []
    for segment in segments:
        if isinstance(segment, np.ndarray) and segment.ndim == 3:
            height, width, _ = segment.shape
            ids += image_token_ids(height // PATCH, width // PATCH)
            images.append(segment)
        else:
            ids += [int(t) for t in segment]
    return ids, images


@torch.no_grad()
def reference_logits(
    model,
    input_ids: Sequence[int],
    pixel_values_list: Sequence[torch.Tensor] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Last-position logits (vocab,) float32; ``pixel_values_list`` holds (1, 3, H, W) tensors, sizes (H, W)."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if not pixel_values_list:
        return model(input_ids=ids).logits[0, -1].float().numpy()
    sizes = list(image_sizes or [tuple(p.shape[-2:]) for p in pixel_values_list])
    # Pixtral's vision tower takes one zero-padded batch and crops each image back to its size.
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    batch = torch.zeros(len(sizes), 3, height, width)
    for i, (pixels, (h, w)) in enumerate(zip(pixel_values_list, sizes, strict=True)):
        batch[i, :, :h, :w] = pixels[0]
    out = model(input_ids=ids, pixel_values=batch, image_sizes=torch.tensor(sizes))
    return out.logits[0, -1].float().numpy()


def segments_reference_logits(model, segments: Sequence[Segment]) -> np.ndarray:
    """Reference logits for the same segments ``prompt_logits`` takes."""
    ids, images = build_inputs(segments)
    pixels = [normalize_pixels(img) for img in images]
    return reference_logits(model, ids, pixels, [img.shape[:2] for img in images])
