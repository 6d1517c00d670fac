"""Typed Pixtral configuration, parsed once from either checkpoint layout.

Both `params.json` (Mistral native) and `config.json` (transformers Llava) become the same
`PixtralConfig`; GGUF metadata is derived from it and nothing else.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixtral_cpp.convert.config_keys import ConfigKeys
from pixtral_cpp.convert.json_files import brief, read_json_object
from pixtral_cpp.errors import ConfigError, UnsupportedCheckpointError

# Mistral advertises a 128k context for Pixtral-12B; params.json carries none.
DEFAULT_CONTEXT_LENGTH = 131072
# RMSNorm eps of the vision tower is in no config file; every reference implementation hard-codes it.
VISION_NORM_EPS = 1e-5
# The vision RoPE base; llama.cpp hard-codes it too, so only a different value matters (we refuse it).
VISION_ROPE_THETA = 10000.0

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


# GGUF stores these hyper-parameters as uint32 and the epsilons and RoPE bases as float32.
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
# llama.cpp preprocesses every image to RGB; a patch embedding for other channel counts aborts in ggml.
IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class ConfigOrigin:
    """Where a config came from, so that a rule broken in `__post_init__` names the file and the key."""

    where: str = "config"
    keys: Mapping[str, str] = field(default_factory=dict)  # dataclass field -> the file's key
    prefix: str = ""  # the section, for fields whose key is the field's own name

    def key(self, name: str) -> str:
        return self.keys.get(name, self.prefix + name)


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
    origin: ConfigOrigin = field(default=ConfigOrigin(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # Each rule guards an assertion or a division in llama.cpp, or a GGUF field the value would not fit.
        _check_counts(self, self.origin, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "ffn_size", "vocab_size", "context_length")
        _check_float32_positive(self, self.origin, "norm_eps", "rope_theta")
        _check_multiple(self, self.origin, "num_heads", "num_kv_heads")
        if self.head_dim % 2:
            raise ConfigError(f"{self.origin.where}: {self.origin.key('head_dim')} must be even for RoPE, "
                              f"got {self.head_dim}")

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
    origin: ConfigOrigin = field(default=ConfigOrigin(), compare=False, repr=False)

    def __post_init__(self) -> None:
        where, key = self.origin.where, self.origin.key
        _check_counts(self, self.origin, "hidden_size", "num_layers", "num_heads", "ffn_size", "num_channels",
                      "image_size", "patch_size")
        _check_float32_positive(self, self.origin, "norm_eps", "rope_theta")
        if self.num_channels != IMAGE_CHANNELS:
            raise ConfigError(f"{where}: {key('num_channels')} is {self.num_channels}; llama.cpp feeds the "
                              f"vision encoder RGB images ({IMAGE_CHANNELS} channels)")
        _check_multiple(self, self.origin, "hidden_size", "num_heads")
        _check_multiple(self, self.origin, "image_size", "patch_size")
        if self.head_dim % 4:
            raise ConfigError(f"{where}: head_dim {self.head_dim} ({key('hidden_size')} / {key('num_heads')}) "
                              f"must be a multiple of 4 (2D RoPE)")
        if not math.isclose(self.rope_theta, VISION_ROPE_THETA):
            raise ConfigError(f"{where}: {key('rope_theta')} {self.rope_theta} is not supported; "
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


def _check_count(origin: ConfigOrigin, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= UINT32_MAX:
        raise ConfigError(f"{origin.where}: {origin.key(name)} must be a positive integer "
                          f"(at most {UINT32_MAX}), got {brief(value)}")


def _check_counts(config: object, origin: ConfigOrigin, *names: str) -> None:
    for name in names:
        _check_count(origin, name, getattr(config, name))


def _check_float32_positive(config: object, origin: ConfigOrigin, *names: str) -> None:
    """Finite, above zero, and still above zero once stored as GGUF's float32 (llama.cpp asserts on it)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{origin.where}: {origin.key(name)} must be a number, got {brief(value)}")
        if not (math.isfinite(value) and 0 < value <= FLOAT32_MAX) or struct.unpack(
                "<f", struct.pack("<f", value))[0] == 0:
            raise ConfigError(f"{origin.where}: {origin.key(name)} must be a finite number above 0 that "
                              f"float32 can hold, got {value!r}")


def _check_multiple(config: object, origin: ConfigOrigin, name: str, divisor_name: str) -> None:
    value, divisor = getattr(config, name), getattr(config, divisor_name)
    if value % divisor:
        raise ConfigError(f"{origin.where}: {origin.key(name)} ({value}) is not a multiple of "
                          f"{origin.key(divisor_name)} ({divisor})")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with errors that name the file."""
    return read_json_object(path, ConfigError)


# Dataclass field -> key, where the two differ, so that errors name what the user will find in the file.
_NATIVE_TEXT_KEYS = {"hidden_size": "dim", "num_layers": "n_layers", "num_heads": "n_heads",
                     "num_kv_heads": "n_kv_heads", "ffn_size": "hidden_dim"}
_HF_TEXT_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads", "ffn_size": "intermediate_size", "norm_eps": "rms_norm_eps",
                 "context_length": "max_position_embeddings"}
_VISION_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "ffn_size": "intermediate_size", "norm_eps": "layer_norm_eps"}


def _origin(path: Path, prefix: str, keys: dict[str, str]) -> ConfigOrigin:
    return ConfigOrigin(str(path), {name: prefix + key for name, key in keys.items()}, prefix)


def parse_params_json(path: Path, context_length: int | None = None) -> PixtralConfig:
    """Mistral-native `params.json` (mistral-inference field names)."""
    top = ConfigKeys(read_json(path), str(path))
    if "vision_encoder" not in top.data:
        raise UnsupportedCheckpointError(
            f"{path}: no 'vision_encoder' section; this is a text-only Mistral model, not Pixtral")
    enc = top.section("vision_encoder")
    if enc.data.get("mm_projector_id") or enc.data.get("spatial_merge_size", 1) != 1:
        raise UnsupportedCheckpointError(
            f"{path}: the vision encoder has a patch merger (Mistral-Small-3.1 style); only Pixtral-12B is supported")
    context_key, native_context = _native_context_length(top)
    text_origin = _origin(path, "", {**_NATIVE_TEXT_KEYS, "context_length": context_key})
    hidden, num_heads = top.int("dim"), top.int("n_heads")
    text = TextConfig(
        hidden_size=hidden,
        num_layers=top.int("n_layers"),
        num_heads=num_heads,
        num_kv_heads=top.int("n_kv_heads"),
        head_dim=_head_dim(top, text_origin, hidden, num_heads),
        ffn_size=top.int("hidden_dim"),
        vocab_size=top.int("vocab_size"),
        rope_theta=top.float("rope_theta", 10000.0),
        norm_eps=top.float("norm_eps"),
        context_length=_context_length(context_length) or native_context,
        origin=text_origin,
    )
    vision = _vision_config(enc, _origin(path, "vision_encoder.", _VISION_KEYS),
                            rope_theta=enc.float("rope_theta", VISION_ROPE_THETA),
                            adapter_bias=enc.bool("adapter_bias", True))
    return PixtralConfig(text=text, vision=vision, layout="native",
                         image_token_id=enc.optional_int("image_token_id"))


def _native_context_length(top: ConfigKeys) -> tuple[str, int]:
    for key in ("max_position_embeddings", "max_seq_len", "n_ctx", "max_sequence_length"):
        if top.data.get(key) is not None:
            return key, top.int(key)
    return "context length", DEFAULT_CONTEXT_LENGTH


def _context_length(requested: int | None) -> int | None:
    """The caller's override of the training context, checked like a config value."""
    if requested is not None:
        _check_count(ConfigOrigin("requested context length"), "context_length", requested)
    return requested


def _head_dim(section: ConfigKeys, origin: ConfigOrigin, hidden: int, num_heads: int) -> int:
    """`head_dim` when the file gives it, else width / heads, which must then divide exactly."""
    if section.data.get("head_dim") is not None:
        return section.int("head_dim")
    _check_count(origin, "hidden_size", hidden)
    _check_count(origin, "num_heads", num_heads)
    if hidden % num_heads:
        raise ConfigError(f"{origin.where}: {origin.key('hidden_size')} ({hidden}) is not a multiple of "
                          f"{origin.key('num_heads')} ({num_heads}) and no {origin.key('head_dim')} is given")
    return hidden // num_heads


def _vision_config(section: ConfigKeys, origin: ConfigOrigin, *, rope_theta: float, adapter_bias: bool) -> VisionConfig:
    """The vision tower from `vision_encoder` (native) or `vision_config` (transformers): the same keys."""
    vision = VisionConfig(
        hidden_size=section.int("hidden_size"),
        num_layers=section.int("num_hidden_layers"),
        num_heads=section.int("num_attention_heads"),
        ffn_size=section.int("intermediate_size"),
        num_channels=section.int("num_channels", IMAGE_CHANNELS),
        image_size=section.int("image_size"),
        patch_size=section.int("patch_size"),
        rope_theta=rope_theta,
        adapter_bias=adapter_bias,
        # In no published config; the reference hard-codes 1e-5, and llama.cpp's converter reads this key.
        norm_eps=section.float("layer_norm_eps", VISION_NORM_EPS),
        origin=origin,
    )
    stated = section.optional_int("head_dim")
    if stated is not None and stated != vision.head_dim:
        raise ConfigError(f"{origin.where}: {origin.key('head_dim')} {stated} != hidden_size/num_attention_heads "
                          f"= {vision.head_dim}")
    return vision


def parse_config_json(path: Path, context_length: int | None = None) -> PixtralConfig:
    """transformers `config.json` of a LlavaForConditionalGeneration with a Pixtral vision tower."""
    top = ConfigKeys(read_json(path), str(path), LLAVA_DEFAULTS)
    architectures = top.data.get("architectures") or []
    if not isinstance(architectures, list):
        raise ConfigError(f"{path}: key 'architectures' must be a list, got {brief(architectures)}")
    if "LlavaForConditionalGeneration" not in architectures and top.data.get("model_type") != "llava":
        raise UnsupportedCheckpointError(
            f"{path}: architectures {brief(architectures)} is not LlavaForConditionalGeneration; "
            "not a Pixtral checkpoint")
    vis = top.section("vision_config", PIXTRAL_VISION_DEFAULTS)
    if vis.data.get("model_type", "pixtral") != "pixtral":
        raise UnsupportedCheckpointError(
            f"{path}: vision_config.model_type is {brief(vis.data.get('model_type'))}, expected 'pixtral'")
    if top.data.get("spatial_merge_size", 1) != 1:
        raise UnsupportedCheckpointError(f"{path}: spatial_merge_size {brief(top.data['spatial_merge_size'])} "
                                         "means Mistral-Small-3.1, not Pixtral-12B")
    txt = top.section("text_config", MISTRAL_TEXT_DEFAULTS)
    _require_activation(vis, "hidden_act", "silu")
    _require_activation(txt, "hidden_act", "silu")
    _require_activation(top, "projector_hidden_act", "gelu")
    text_origin = _origin(path, "text_config.", _HF_TEXT_KEYS)
    hidden, num_heads = txt.int("hidden_size"), txt.int("num_attention_heads")
    text = TextConfig(
        hidden_size=hidden,
        num_layers=txt.int("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=txt.int("num_key_value_heads"),
        head_dim=_head_dim(txt, text_origin, hidden, num_heads),
        ffn_size=txt.int("intermediate_size"),
        vocab_size=txt.int("vocab_size"),
        rope_theta=_rope_theta(txt, MISTRAL_TEXT_DEFAULTS["rope_theta"]),
        norm_eps=txt.float("rms_norm_eps"),
        context_length=_context_length(context_length) or txt.int("max_position_embeddings"),
        origin=text_origin,
    )
    vision = _vision_config(vis, _origin(path, "vision_config.", _VISION_KEYS),
                            rope_theta=_rope_theta(vis, VISION_ROPE_THETA),
                            adapter_bias=top.bool("multimodal_projector_bias"))
    return PixtralConfig(text=text, vision=vision, layout="hf", image_token_id=top.int("image_token_index"))


def _rope_theta(section: ConfigKeys, default: float) -> float:
    """transformers < 5 writes `rope_theta`; 5.x nests it in `rope_parameters`."""
    params = section.data.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        # transformers 5 labels Pixtral's 2D vision RoPE "axial"; scaled variants (yarn, linear) are not Pixtral.
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "axial"):
            raise ConfigError(f"{section.where}: rope_type {brief(rope_type)} is not supported "
                              "(expected 'default')")
        return ConfigKeys(params, f"{section.where} [rope_parameters]").float("rope_theta")
    return section.float("rope_theta", default)


def _require_activation(section: ConfigKeys, key: str, expected: str) -> None:
    value = section.str(key)
    if value != expected:
        raise UnsupportedCheckpointError(f"{section.where}: {key} is {brief(value)}; Pixtral uses {expected!r}")
