"""pixtral-cpp's own files as other tools read them (docs/other-tools.md): the kinds and folder layout that
llama.cpp's -hf rule, LM Studio and Ollama go by, and the chat format llama.cpp's non-Jinja route takes from
the embedded template. Converted for real from a tiny synthetic checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import pytest

from pixtral_cpp.backend.chat_template import apply_builtin_chat_template
from pixtral_cpp.convert.chat_template import PIXTRAL_CHAT_TEMPLATE
from pixtral_cpp.errors import BackendError
from tests.gguf_helpers import field, read_gguf


@pytest.fixture(scope="module")
def q8_pair(converted) -> tuple[Path, Path]:
    return converted("Q8_0", "F16")


def test_general_type_says_model_and_mmproj(q8_pair: tuple[Path, Path]) -> None:
    """Ollama files a GGUF whose general.type is "mmproj" as a projector layer (server/create.go,
    isProjectorGGUF); llama.cpp's converter writes the same two kinds (conversion/base.py)."""
    text, mmproj = q8_pair
    assert field(read_gguf(text), gguf.Keys.General.TYPE) == gguf.GGUFType.MODEL == "model"
    assert field(read_gguf(mmproj), gguf.Keys.General.TYPE) == gguf.GGUFType.MMPROJ == "mmproj"
    # Ollama's other projector test: architecture clip, a vision encoder, no clip.block_count.
    header = read_gguf(mmproj)
    assert field(header, gguf.Keys.General.ARCHITECTURE) == "clip"
    assert field(header, "clip.has_vision_encoder") is True
    assert "clip.block_count" not in header.metadata


def test_folder_layout_is_the_one_other_tools_pair(q8_pair: tuple[Path, Path]) -> None:
    """One folder, mmproj beside the model: llama.cpp's -hf rule, LM Studio's publisher/model/ folders and
    pixtral-cpp's own --mmproj default pair a model with the file of that folder named *mmproj*."""
    text, mmproj = q8_pair
    assert text.parent == mmproj.parent
    assert "mmproj" in mmproj.name.lower() and "mmproj" not in text.name.lower()
    # -hf's tag match: the quant name, case-insensitive, followed by "." or "-".
    assert re.search(r"q8_0[.-]", text.name.lower())
    assert sorted(p.name for p in text.parent.glob("*.gguf")) == sorted([text.name, mmproj.name])
    assert not [p for p in text.parent.iterdir() if p.name.startswith(".")]  # no partial files left


MESSAGES = [
    [("user", "Hi")],
    [("system", "Be brief."), ("user", "<__media__>What is it?")],
    [("user", "Hi"), ("assistant", "Hello!"), ("user", "<__media__><__media__>Compare them.")],
]


@pytest.mark.parametrize("messages", MESSAGES)
def test_the_files_template_is_mistral_v3_tekken_to_llama_cpp(q8_pair: tuple[Path, Path],
                                                             messages: list[tuple[str, str]]) -> None:
    """The template as written in the GGUF is rendered by llama.cpp's C++ mistral-v3-tekken format when
    a tool runs without --jinja (llama-mtmd-cli's default)."""
    template = field(read_gguf(q8_pair[0]), gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    assert template == PIXTRAL_CHAT_TEMPLATE
    rendered = apply_builtin_chat_template(template, messages)
    assert rendered == apply_builtin_chat_template("mistral-v3-tekken", messages)
    assert " [INST]" not in template and "[SYSTEM_PROMPT]" not in template  # would pick v1 / v7
    assert rendered.startswith("[INST]") and "[INST] " not in rendered


def test_unknown_template_is_one_clear_error() -> None:
    with pytest.raises(BackendError, match="no built-in chat format"):
        apply_builtin_chat_template("{{ messages }}", [("user", "Hi")])
