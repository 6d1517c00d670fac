"""Typed Pixtral configuration, parsed once from either checkpoint layout.

Both `params.json` (Mistral native) and `config.json` (transformers Llava) become the same
`PixtralConfig`; GGUF metadata is derived from it and nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixtral_cpp.errors import ConfigError, UnsupportedCheckpointError

# Mistral advertises a 128k context for Pixtral-12B; params.json carries none.
DEFAULT_CONTEXT_LENGTH = 131072
# RMSNorm eps of the vision tower is in no config file; every reference implementation hard-codes it.
VISION_NORM_EPS = 1e-5
# The vision RoPE base; llama.cpp hard-codes it too, so only a different value matters (we refuse it).
VISION_ROPE_THETA = 10000.0
# CLIP normalisation used by mistral-common (DATASET_MEAN / DATASET_STD) and preprocessor_config.json.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Defaults of transformers' config classes, applied when an (older, sparse) config.json omits a key.
MISTRAL_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,  # None means hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
PIXTRAL_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 1024,
    "patch_size": 16,
    "hidden_act": "gelu",
    "rope_theta": 10000.0,
}
LLAVA_DEFAULTS: dict[str, Any] = {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "multimodal_projector_bias": True,
}


@dataclass(frozen=True)
class TextConfig:
    """The Mistral-NeMo-shaped decoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    context_length: int

    def __post_init__(self) -> None:
        _require_positive(self, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                          "ffn_size", "vocab_size", "context_length")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"text config: num_heads ({self.num_heads}) is not a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"text config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral ViT (RMSNorm, 2D RoPE, SiLU-gated FFN) and its two-layer adapter."""

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    num_channels: int
    image_size: int
    patch_size: int
    rope_theta: float
    adapter_bias: bool
    norm_eps: float = VISION_NORM_EPS

    def __post_init__(self) -> None:
        _require_positive(self, "hidden_size", "num_layers", "num_heads", "ffn_size", "num_channels",
                          "image_size", "patch_size")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision config: hidden_size ({self.hidden_size}) is not a multiple of "
                              f"num_attention_heads ({self.num_heads})")
        if self.head_dim % 4:
            raise ConfigError(f"vision config: head_dim {self.head_dim} must be a multiple of 4 (2D RoPE)")
        if not math.isclose(self.rope_theta, VISION_ROPE_THETA):
            raise ConfigError(f"vision config: rope_theta {self.rope_theta} is not supported; "
                              f"llama.cpp's Pixtral encoder is fixed at {VISION_ROPE_THETA:g}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class PixtralConfig:
    """Everything the converter needs to know about one checkpoint."""

    text: TextConfig
    vision: VisionConfig
    layout: str  # "native" or "hf"
    image_token_id: int | None = None  # from the config when present; cross-checked with the tokenizer


def _require_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with errors that name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class _Keys:
    """Typed access to one JSON object, every error naming the file and the key."""

    def __init__(self, data: dict[str, Any], where: str, defaults: dict[str, Any] | None = None) -> None:
        self.data, self.where, self.defaults = data, where, defaults or {}

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if self.defaults.get(key) is not None:
            return self.defaults[key]
        if default is not _MISSING:
            return default
        raise ConfigError(f"{self.where}: required key '{key}' is missing")

    def int(self, key: str, default: Any = None) -> int:
        value = self._get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}: key '{key}' must be an integer, got {value!r}")
        return value

    def float(self, key: str, default: Any = None) -> float:
        value = self._get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.where}: key '{key}' must be a number, got {value!r}")
        return float(value)

    def str(self, key: str, default: Any = None) -> str:
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.where}: key '{key}' must be a string, got {value!r}")
        return value

    def bool(self, key: str, default: Any = None) -> bool:
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: key '{key}' must be true or false, got {value!r}")
        return value

    def optional_int(self, key: str) -> int | None:
        return self.int(key) if self.data.get(key) is not None else None

    def section(self, key: str, defaults: dict[str, Any] | None = None) -> _Keys:
        value = self.data.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where}: key '{key}' must be an object")
        return _Keys(value, f"{self.where} [{key}]", defaults)


_MISSING = object()


def parse_params_json(path: Path, context_length: int | None = None) -> PixtralConfig:
    """Mistral-native `params.json` (mistral-inference field names)."""
    top = _Keys(read_json(path), str(path))
    if "vision_encoder" not in top.data:
        raise UnsupportedCheckpointError(
            f"{path}: no 'vision_encoder' section; this is a text-only Mistral model, not Pixtral")
    enc = top.section("vision_encoder")
    if enc.data.get("mm_projector_id") or enc.data.get("spatial_merge_size", 1) != 1:
        raise UnsupportedCheckpointError(
            f"{path}: the vision encoder has a patch merger (Mistral-Small-3.1 style); only Pixtral-12B is supported")
    hidden = top.int("dim")
    num_heads = top.int("n_heads")
    text = TextConfig(
        hidden_size=hidden,
        num_layers=top.int("n_layers"),
        num_heads=num_heads,
        num_kv_heads=top.int("n_kv_heads"),
        head_dim=top.int("head_dim", hidden // num_heads),
        ffn_size=top.int("hidden_dim"),
        vocab_size=top.int("vocab_size"),
        rope_theta=top.float("rope_theta", 10000.0),
        norm_eps=top.float("norm_eps"),
        context_length=context_length or _native_context_length(top),
    )
    vision = VisionConfig(
        hidden_size=enc.int("hidden_size"),
        num_layers=enc.int("num_hidden_layers"),
        num_heads=enc.int("num_attention_heads"),
        ffn_size=enc.int("intermediate_size"),
        num_channels=enc.int("num_channels", 3),
        image_size=enc.int("image_size"),
        patch_size=enc.int("patch_size"),
        rope_theta=enc.float("rope_theta", VISION_ROPE_THETA),
        adapter_bias=enc.bool("adapter_bias", True),
    )
    return PixtralConfig(text=text, vision=vision, layout="native",
                         image_token_id=enc.optional_int("image_token_id"))


def _native_context_length(top: _Keys) -> int:
    for key in ("max_position_embeddings", "max_seq_len", "n_ctx", "max_sequence_length"):
        if top.data.get(key) is not None:
            return top.int(key)
    return DEFAULT_CONTEXT_LENGTH


def parse_config_json(path: Path, context_length: int | None = None) -> PixtralConfig:
    """transformers `config.json` of a LlavaForConditionalGeneration with a Pixtral vision tower."""
    top = _Keys(read_json(path), str(path), LLAVA_DEFAULTS)
    architectures = top.data.get("architectures") or []
    if "LlavaForConditionalGeneration" not in architectures and top.data.get("model_type") != "llava":
        raise UnsupportedCheckpointError(
            f"{path}: architectures {architectures} is not LlavaForConditionalGeneration; not a Pixtral checkpoint")
    vis = top.section("vision_config", PIXTRAL_VISION_DEFAULTS)
    if vis.data.get("model_type", "pixtral") != "pixtral":
        raise UnsupportedCheckpointError(
            f"{path}: vision_config.model_type is {vis.data.get('model_type')!r}, expected 'pixtral'")
    if top.data.get("spatial_merge_size", 1) != 1:
        raise UnsupportedCheckpointError(
            f"{path}: spatial_merge_size {top.data['spatial_merge_size']} means Mistral-Small-3.1, not Pixtral-12B")
    txt = top.section("text_config", MISTRAL_TEXT_DEFAULTS)
    _require_activation(vis, "hidden_act", "silu")
    _require_activation(txt, "hidden_act", "silu")
    _require_activation(top, "projector_hidden_act", "gelu")
    hidden = txt.int("hidden_size")
    num_heads = txt.int("num_attention_heads")
    text = TextConfig(
        hidden_size=hidden,
        num_layers=txt.int("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=txt.int("num_key_value_heads"),
        head_dim=txt.int("head_dim", hidden // num_heads),
        ffn_size=txt.int("intermediate_size"),
        vocab_size=txt.int("vocab_size"),
        rope_theta=_rope_theta(txt, MISTRAL_TEXT_DEFAULTS["rope_theta"]),
        norm_eps=txt.float("rms_norm_eps"),
        context_length=context_length or txt.int("max_position_embeddings"),
    )
    vision = VisionConfig(
        hidden_size=vis.int("hidden_size"),
        num_layers=vis.int("num_hidden_layers"),
        num_heads=vis.int("num_attention_heads"),
        ffn_size=vis.int("intermediate_size"),
        num_channels=vis.int("num_channels"),
        image_size=vis.int("image_size"),
        patch_size=vis.int("patch_size"),
        rope_theta=_rope_theta(vis, VISION_ROPE_THETA),
        adapter_bias=top.bool("multimodal_projector_bias"),
    )
    vis_head_dim = vis.data.get("head_dim")
    if vis_head_dim is not None and vis_head_dim != vision.head_dim:
        raise ConfigError(f"{path}: vision_config.head_dim {vis_head_dim} != hidden_size/num_attention_heads "
                          f"= {vision.head_dim}")
    return PixtralConfig(text=text, vision=vision, layout="hf", image_token_id=top.int("image_token_index"))


def _rope_theta(section: _Keys, default: float) -> float:
    """transformers < 5 writes `rope_theta`; 5.x nests it in `rope_parameters`."""
    params = section.data.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        # transformers 5 labels Pixtral's 2D vision RoPE "axial"; scaled variants (yarn, linear) are not Pixtral.
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "axial"):
            raise ConfigError(f"{section.where}: rope_type {rope_type!r} is not supported (expected 'default')")
        return _Keys(params, f"{section.where} [rope_parameters]").float("rope_theta")
    return section.float("rope_theta", default)


def _require_activation(section: _Keys, key: str, expected: str) -> None:
    value = section.str(key)
    if value != expected:
        raise UnsupportedCheckpointError(f"{section.where}: {key} is {value!r}; Pixtral uses {expected!r}")
