"""Typed options for loading a model and for one generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pixtral_cpp.backend.sampling import SamplingOptions
from pixtral_cpp.defaults import DEFAULT_CONTEXT, DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DISK_CACHE_MAX_BYTES
from pixtral_cpp.errors import OptionsError
from pixtral_cpp.images import MAX_IMAGE_SIZE, check_max_image_size
from pixtral_cpp.valid_text import check_json_text, check_text


@dataclass(frozen=True)
class ModelOptions:
    """How to load the GGUF pair: context size, threads, offload, image budget."""

    n_ctx: int = DEFAULT_CONTEXT
    threads: int | None = None  # None: physical cores
    gpu_layers: int = 0  # text layers offloaded to Metal/CUDA (-1: all)
    vision_gpu: bool | None = None  # the vision encoder on the GPU; None: when text layers are offloaded
    max_image_size: int = MAX_IMAGE_SIZE  # longest image edge in px; smaller is faster, fewer tokens
    seed: int | None = None  # default sampling seed; None: random
    # llama.cpp's repacked weight copy: faster generation, slower load and prompt (docs/benchmarks.md).
    repack_weights: bool = False
    use_mmap: bool | None = None  # None: map the model file, unless repacking
    # llama.cpp's CPU flash attention works in F16 and drifts by ~4e-2 on long image prompts: off by default.
    flash_attn: Literal["auto", "on", "off"] = "off"
    kv_cache_type: Literal["f16", "f32"] = "f16"
    n_batch: int = 512
    # Encoded images kept for follow-up questions: up to 85 MB each at 12B (4159 x 5120 float32).
    image_cache_size: int = 4
    verbose: bool = False  # llama.cpp's own logging
    # Evaluated prompt prefixes kept on disk for later processes (pixtral_cpp.disk_cache, docs/prompt-cache.md).
    disk_cache: bool = True
    disk_cache_dir: str | Path | None = None  # None: $PIXTRAL_CPP_CACHE_DIR or the user's cache folder
    disk_cache_max_bytes: int = DISK_CACHE_MAX_BYTES

    def __post_init__(self) -> None:
        check_max_image_size(self.max_image_size)
        if self.n_ctx < 256:
            raise OptionsError(f"n_ctx must be at least 256, got {self.n_ctx}")
        if self.image_cache_size < 0:
            raise OptionsError(f"image_cache_size must be 0 or more, got {self.image_cache_size}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads must be positive, got {self.threads}")
        if isinstance(self.disk_cache_max_bytes, bool) or not isinstance(self.disk_cache_max_bytes, int) \
                or self.disk_cache_max_bytes < 1:
            raise OptionsError(f"disk_cache_max_bytes must be a positive number of bytes, got "
                               f"{self.disk_cache_max_bytes!r}")
        if self.disk_cache_dir is not None and not isinstance(self.disk_cache_dir, (str, Path)):
            raise OptionsError(f"disk_cache_dir must be a folder path, got {self.disk_cache_dir!r}")
        if isinstance(self.disk_cache_dir, str) and not self.disk_cache_dir.strip():
            raise OptionsError("disk_cache_dir must be a folder path, got an empty string")


@dataclass(frozen=True)
class GenerationOptions:
    """One answer: length, sampling, stop strings, optional JSON schema."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # see pixtral_cpp.defaults
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # None: the model's default seed
    stop: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise OptionsError(f"max_tokens must be positive, got {self.max_tokens}")
        if isinstance(self.stop, str):  # a lone string would be iterated character by character
            object.__setattr__(self, "stop", (self.stop,))
        # Text llama.cpp or the answer is matched against must be valid Unicode (pixtral_cpp.valid_text).
        for number, stop in enumerate(self.stop):
            check_text(stop, f"stop string {number}")
        if self.json_schema is not None:
            check_json_text(self.json_schema, "the JSON schema")
        self.sampling(self.seed)  # refuse bad values now, not after minutes of image prefill

    def sampling(self, default_seed: int | None) -> SamplingOptions:
        """The sampler settings of this generation (the model's seed when none is given here)."""
        return SamplingOptions(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               repeat_penalty=self.repeat_penalty,
                               seed=self.seed if self.seed is not None else default_seed)
