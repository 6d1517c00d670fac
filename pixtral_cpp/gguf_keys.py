"""The GGUF spellings and fixed values that the converter writes and the readers check, each spelled once.

Key names are gguf-py's (`gguf.Keys`, 0.19); the text model's `{arch}.*` templates are filled for `llama` in
`TextKeys`, and the few keys clip.cpp reads that gguf-py has no constant for are in `ClipExtraKeys`. Only
this module spells a key, the `[IMG_BREAK]` tensor or the CLIP normalisation (docs/gguf-layout.md §2.3, §4).
Importing it loads gguf-py only, never llama.cpp.
"""

from __future__ import annotations

import gguf

Keys = gguf.Keys

TEXT_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # Pixtral's decoder is Mistral-NeMo: llama.cpp's `llama`
MMPROJ_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # `clip`: the placeholder arch of projectors
PIXTRAL_PROJECTOR = gguf.VisionProjectorType.PIXTRAL  # clip.projector_type

# [IMG_BREAK]'s embedding, cut from the text embedding into the mmproj (no `.weight` suffix).
IMG_BREAK_TENSOR = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK]

# OpenAI CLIP normalisation, which Pixtral uses (mistral-common's DATASET_MEAN / DATASET_STD, the HF
# preprocessor_config.json); params.json carries none, so the converter writes these.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def text_key(template: str) -> str:
    """A gguf-py `{arch}.*` key template spelled for the text GGUF."""
    return template.format(arch=TEXT_ARCH)


class TextKeys:
    """The `llama.*` keys llama.cpp reads from the text GGUF."""

    CONTEXT_LENGTH = text_key(Keys.LLM.CONTEXT_LENGTH)
    EMBEDDING_LENGTH = text_key(Keys.LLM.EMBEDDING_LENGTH)
    BLOCK_COUNT = text_key(Keys.LLM.BLOCK_COUNT)
    FEED_FORWARD_LENGTH = text_key(Keys.LLM.FEED_FORWARD_LENGTH)
    VOCAB_SIZE = text_key(Keys.LLM.VOCAB_SIZE)
    EXPERT_COUNT = text_key(Keys.LLM.EXPERT_COUNT)
    EXPERT_USED_COUNT = text_key(Keys.LLM.EXPERT_USED_COUNT)
    HEAD_COUNT = text_key(Keys.Attention.HEAD_COUNT)
    HEAD_COUNT_KV = text_key(Keys.Attention.HEAD_COUNT_KV)
    KEY_LENGTH = text_key(Keys.Attention.KEY_LENGTH)
    VALUE_LENGTH = text_key(Keys.Attention.VALUE_LENGTH)
    LAYERNORM_RMS_EPS = text_key(Keys.Attention.LAYERNORM_RMS_EPS)
    ROPE_DIMENSION_COUNT = text_key(Keys.Rope.DIMENSION_COUNT)
    ROPE_FREQ_BASE = text_key(Keys.Rope.FREQ_BASE)
    ROPE_SCALING_TYPE = text_key(Keys.Rope.SCALING_TYPE)
    ROPE_SCALING_FACTOR = text_key(Keys.Rope.SCALING_FACTOR)


class ClipExtraKeys:
    """Keys clip.cpp's load_hparams reads for which gguf-py 0.19 has no constant (vendor/llama.cpp clip-impl.h)."""

    HAS_GEN_AUDIO_ENCODER = "clip.has_gen_audio_encoder"
    MINICPMV_VERSION = "clip.minicpmv_version"
    MINICPMV_QUERY_NUM = "clip.minicpmv_query_num"
    VISION_HEAD_COUNT_KV = "clip.vision.attention.head_count_kv"
    VISION_HEAD_DIM = "clip.vision.attention.head_dim"
    FEATURE_LAYER = "clip.vision.feature_layer"
    IMAGE_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
    MM_PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"
