"""The JSON files beside the weights: params.json (native) and the old-style HF config files."""

from __future__ import annotations

from typing import Any

from pixtral_cpp.gguf_keys import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from pixtral_cpp.synthetic.shapes import SyntheticShape

IMG_TOKEN_ID = 10  # [IMG] in tekken v3
TEXT_ROPE_THETA = 1_000_000_000.0
VISION_ROPE_THETA = 10_000.0
NORM_EPS = 1e-5
HF_MAX_POSITIONS = 1_024_000  # mistral-community/pixtral-12b config.json
OLD_TRANSFORMERS_VERSION = "4.45.0.dev0"

# Field defaults of the transformers config classes a sparse config leans on. Copied from transformers 5.24
# (models/mistral/configuration_mistral.py, models/pixtral/configuration_pixtral.py); tests compare them
# with the installed classes.
MISTRAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "sliding_window": 4096,
}
PIXTRAL_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 1024, "patch_size": 16, "hidden_act": "gelu",
}



def native_params(shape: SyntheticShape) -> dict[str, Any]:
    """params.json as shipped with Pixtral-12B-2409: mistral-inference keys, no context length and no
    image_break/image_end ids (converters must cope with both omissions)."""
    text, vision = shape.text, shape.vision
    return {
        "dim": text.hidden, "n_layers": text.layers, "head_dim": text.head_dim, "hidden_dim": text.ffn,
        "n_heads": text.heads, "n_kv_heads": text.kv_heads, "rope_theta": TEXT_ROPE_THETA,
        "norm_eps": NORM_EPS, "vocab_size": text.vocab,
        "vision_encoder": {
            "hidden_size": vision.hidden, "num_channels": vision.channels, "image_size": vision.image_size,
            "patch_size": vision.patch, "rope_theta": VISION_ROPE_THETA, "intermediate_size": vision.ffn,
            "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads,
            "image_token_id": IMG_TOKEN_ID,
        },
    }


def _without_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in defaults or defaults[key] != value}


def _hf_text_config(shape: SyntheticShape) -> dict[str, Any]:
    text = shape.text
    return {
        "model_type": "mistral", "hidden_size": text.hidden, "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads, "num_key_value_heads": text.kv_heads, "head_dim": text.head_dim,
        "intermediate_size": text.ffn, "hidden_act": "silu", "max_position_embeddings": HF_MAX_POSITIONS,
        "rms_norm_eps": NORM_EPS, "rope_theta": TEXT_ROPE_THETA, "vocab_size": text.vocab,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }


def _hf_vision_config(shape: SyntheticShape) -> dict[str, Any]:
    vision = shape.vision
    return {
        "model_type": "pixtral", "hidden_size": vision.hidden, "intermediate_size": vision.ffn,
        "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads, "head_dim": vision.head_dim,
        "num_channels": vision.channels, "image_size": vision.image_size, "patch_size": vision.patch,
        "hidden_act": "silu", "rope_theta": VISION_ROPE_THETA,
    }


def hf_config(shape: SyntheticShape, torch_dtype: str, sparse: bool = True) -> dict[str, Any]:
    """config.json in the transformers 4.45 style of mistral-community/pixtral-12b.

    rope_theta sits directly in both sub-configs (transformers 5 moved it into rope_parameters). With
    `sparse`, sub-config keys equal to the class defaults are left out, as the community file does, so a
    reader must know those defaults (e.g. num_attention_heads 32 never appears for the real model).
    """
    text, vision = _hf_text_config(shape), _hf_vision_config(shape)
    if sparse:
        text = _without_defaults(text, MISTRAL_DEFAULTS)
        vision = _without_defaults(vision, PIXTRAL_VISION_DEFAULTS)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMG_TOKEN_ID,
        "image_seq_length": 1,
        "projector_hidden_act": "gelu",
        # Pixtral feeds the last encoder layer, all patches, to the adapter (Llava defaults: -2, "default").
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": torch_dtype,
        "transformers_version": OLD_TRANSFORMERS_VERSION,
    }


def preprocessor_config(shape: SyntheticShape) -> dict[str, Any]:
    """preprocessor_config.json for transformers' PixtralImageProcessor."""
    patch = shape.vision.patch
    return {
        "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(CLIP_IMAGE_MEAN), "image_std": list(CLIP_IMAGE_STD),
        "patch_size": {"height": patch, "width": patch},
        "resample": 3, "rescale_factor": 1 / 255, "size": {"longest_edge": shape.vision.image_size},
    }


def generation_config() -> dict[str, Any]:
    """generation_config.json: BOS <s> = 1, EOS </s> = 2."""
    return {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
            "transformers_version": OLD_TRANSFORMERS_VERSION}
