"""The library's defaults, declared once and read by every face (API, CLI, server).

Light on purpose (no imports): `pixtral-cpp --help` reads these without loading the model.
"""

from __future__ import annotations

DEFAULT_PROMPT = "Describe this image in detail."

# One 1024 px image is up to 4160 positions; 8192 holds two with room for text, and costs about
# 1.3 GB of F16 KV cache at 12B (160 KiB per position), not the 1,024,000-token training context.
DEFAULT_CONTEXT = 8192

DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.3  # Mistral's recommendation for Pixtral is low; 0 is greedy

# Models from the hub (pixtral_cpp.model_select, pixtral_cpp.hub_models): what a first run offers to pull, and
# llama.cpp's `-hf` defaults (common/download.cpp: Q4_K_M, then Q8_0).
DEFAULT_HUB_MODEL = "ggml-org/pixtral-12b-GGUF:Q4_K_M"
DEFAULT_TEXT_QUANTS = ("Q4_K_M", "Q8_0")
MMPROJ_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")  # most precise first; the projector is small
YES_ENV = "PIXTRAL_CPP_YES"  # set to 1: accept the first run's offer to pull the default model, as --yes

# The prompt cache on disk (pixtral_cpp.disk_cache, docs/prompt-cache.md). An entry costs 160 KiB per
# position at 12B with an F16 KV cache: about 130 MB for a 1024x768 photo at 512 px, 511 MB at 1024 px.
DISK_CACHE_MAX_BYTES = 4 << 30
# The whole prompt is stored beside the prefix through its last image only when the answer evaluates at least
# this many positions after it: re-evaluating a short question costs about a second at 12B, its entry a whole
# image's bytes (and a chat's follow-up in the same process evaluates only its new turn).
DISK_CACHE_MIN_NEW_POSITIONS = 64
DISK_CACHE_ENV = "PIXTRAL_CPP_CACHE_DIR"  # the prompt cache's folder (default: the user's cache folder)
