"""Bad input to the runtime: a domain error with a clear message, never a crash inside llama.cpp."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from pixtral_cpp.convert import ConvertOptions, convert_checkpoint
from pixtral_cpp.errors import ContextLengthError, ImageError, ModelError
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.model_files import find_model_files
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.synthetic import SHAPES, write_synthetic_checkpoint
from pixtral_cpp.synthetic.shapes import TextShape

SMALL = ModelOptions(n_ctx=1024, threads=2)


@pytest.fixture(scope="module")
def pixtral(converted):
    with PixtralModel.load(converted("F16", "F16")[0], options=SMALL) as model:
        yield model


@pytest.fixture(scope="module")
def other_width_mmproj(tmp_path_factory) -> Path:
    """An mmproj from a Pixtral whose text width differs (a mismatched pair)."""
    import dataclasses

    shape = dataclasses.replace(SHAPES["tiny"], text=TextShape(hidden=512, layers=1, heads=8, kv_heads=2,
                                                                head_dim=64, ffn=512))
    work = tmp_path_factory.mktemp("other")
    source = write_synthetic_checkpoint(work / "Other", layout="native", shape=shape, tokenizer="small")
    return convert_checkpoint(ConvertOptions(source=source, output_dir=work / "out", quant="F16")).mmproj_path


def test_corrupt_and_non_image_inputs(pixtral, tmp_path):
    jpeg = io.BytesIO()
    PILImage.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "half.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    for source in (tmp_path / "half.jpg", tmp_path / "notes.txt", tmp_path / "missing.png", b"\x00" * 10):
        with pytest.raises(ImageError):
            pixtral.describe(source, "Describe.", max_tokens=2)
    assert pixtral.describe(np.zeros((32, 32, 3), np.uint8), "Still fine?", max_tokens=2).stats


def test_prompt_longer_than_the_context(pixtral):
    with pytest.raises(ContextLengthError, match=r"needs \d+ positions \(\d+ for images\) but the context "
                                                 r"holds 1024; raise the context size"):
        pixtral.describe(np.zeros((1024, 1024, 3), np.uint8), "Describe.", max_tokens=2)
    assert pixtral.describe(np.zeros((32, 32, 3), np.uint8), "Still fine?", max_tokens=2).stats


def test_mismatched_mmproj_is_refused_before_llama_cpp(converted, other_width_mmproj):
    with pytest.raises(ModelError, match="embeddings of width 512 but .* expects 256"):
        PixtralModel.load(converted("F16", "F16")[0], other_width_mmproj, SMALL)


def test_non_pixtral_projector_is_refused(tiny_native, tmp_path, monkeypatch, converted):
    from pixtral_cpp.convert import metadata

    monkeypatch.setattr(metadata, "PROJECTOR_TYPE", "gemma3")  # write a projector of another family
    other = convert_checkpoint(ConvertOptions(source=tiny_native, output_dir=tmp_path, quant="F16")).mmproj_path
    with pytest.raises(ModelError, match="is a 'gemma3' projector, not Pixtral's"):
        PixtralModel.load(converted("F16", "F16")[0], other, SMALL)


def test_text_model_given_as_mmproj(converted):
    text = converted("F16", "F16")[0]
    with pytest.raises(ModelError, match="is not an mmproj"):
        PixtralModel.load(text, text, SMALL)


def test_truncated_and_fake_gguf(converted, tmp_path):
    text, mmproj = converted("F16", "F16")
    cut = tmp_path / "cut.gguf"
    with open(text, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(text.stat().st_size // 3))
    with pytest.raises(ModelError, match="truncated"):
        PixtralModel.load(cut, mmproj, SMALL)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelError, match="not a GGUF"):
        PixtralModel.load(fake, mmproj, SMALL)


def test_missing_mmproj_and_missing_model(converted, tmp_path, monkeypatch):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(converted("F16", "F16")[0], lonely / "Pixtral-tiny-F16.gguf")
    with pytest.raises(ModelError, match=r"no mmproj \(mmproj-\*\.gguf\) beside"):
        find_model_files(lonely)
    monkeypatch.delenv("PIXTRAL_CPP_MODEL", raising=False)
    monkeypatch.setenv("PIXTRAL_CPP_MODELS", str(tmp_path / "empty-models"))
    with pytest.raises(ModelError, match="pixtral-cpp convert"):
        find_model_files()


def test_model_found_in_a_folder_and_through_the_environment(converted, monkeypatch):
    text, mmproj = converted("F16", "F16")
    assert find_model_files(text.parent) .mmproj == mmproj
    monkeypatch.setenv("PIXTRAL_CPP_MODEL", str(text))
    files = find_model_files()
    assert (files.text, files.mmproj) == (text, mmproj)
