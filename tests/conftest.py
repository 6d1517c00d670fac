"""Shared fixtures: tiny random Pixtrals in both layouts, converted by the real converter."""

from __future__ import annotations

import os

# torch and llama.cpp in one process on 2 cores: spinning OpenMP threads slow llama.cpp 100x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The prompt cache on disk is on by default: the tests (and the processes they start) use a folder of
# their own, never the user's, emptied before each test so that no test answers from another's entries.
PROMPT_CACHE_DIR = Path(tempfile.mkdtemp(prefix="pixtral-cpp-test-prompts-"))
os.environ["PIXTRAL_CPP_CACHE_DIR"] = str(PROMPT_CACHE_DIR)
atexit.register(shutil.rmtree, PROMPT_CACHE_DIR, True)


@pytest.fixture(autouse=True)
def _empty_prompt_cache() -> None:
    for entry in PROMPT_CACHE_DIR.iterdir() if PROMPT_CACHE_DIR.is_dir() else ():
        if entry.is_file():
            entry.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Corrected copies of others' mmproj files go to the test's own folder, never the user's cache."""
    monkeypatch.setenv("PIXTRAL_CPP_CORRECTED_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


from pixtral_cpp.convert import ConvertOptions, convert_checkpoint  # noqa: E402
from pixtral_cpp.synthetic import write_synthetic_checkpoint  # noqa: E402

SEED = 1234


@pytest.fixture(scope="session")
def tiny_native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral layout: params.json (no context length, no IMG_BREAK ids), consolidated.safetensors, tekken.json."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("native") / "Pixtral-tiny", layout="native",
                                      shape="tiny", seed=SEED)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers layout like mistral-community/pixtral-12b: old sparse config.json, shards, tokenizer.json."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("hf") / "Pixtral-tiny", layout="hf",
                                      shape="tiny", seed=SEED)


def convert_tiny(source: Path, out: Path, quant: str, mmproj_quant: str = "F32") -> tuple[Path, Path]:
    result = convert_checkpoint(ConvertOptions(source=source, output_dir=out, quant=quant,
                                               mmproj_quant=mmproj_quant))
    return result.text_path, result.mmproj_path


@pytest.fixture(scope="session")
def tiny_gguf_pair(tmp_path_factory: pytest.TempPathFactory, tiny_native: Path, tiny_hf: Path
                   ) -> tuple[Path, Path, Path]:
    """(F32 text GGUF, F32 mmproj GGUF, the same weights in transformers layout) for parity tests."""
    text, mmproj = convert_tiny(tiny_native, tmp_path_factory.mktemp("gguf-f32"), "F32")
    return text, mmproj, tiny_hf


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_native: Path):
    """Converted tiny files by (text quant, mmproj quant), made once per session on demand."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(quant: str, mmproj_quant: str = "F32") -> tuple[Path, Path]:
        key = (quant, mmproj_quant)
        if key not in cache:
            cache[key] = convert_tiny(tiny_native, tmp_path_factory.mktemp(f"gguf-{quant}-{mmproj_quant}"),
                                      quant, mmproj_quant)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def pair(converted) -> tuple[Path, Path]:
    """The tiny model as F16 text + F16 mmproj: what the runtime tests load."""
    return converted("F16", "F16")
