"""The Python API against hostile or unlucky input: invalid text, odd image sources and paths, prompts
that cannot fit. Every refusal is a PixtralError with a one-line message, before any slow work."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from pixtral_cpp.conversation import Message, Text, normalize_messages
from pixtral_cpp.errors import ContextLengthError, ConversationError, ImageError, PixtralError
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.valid_text import check_json_text

GREEDY = GenerationOptions(max_tokens=2, temperature=0)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small(pair):
    """The tiny model with the smallest context: one 200x160 image (139 + 1 positions) fits, two do not."""
    with PixtralModel.load(*pair, n_ctx=256, threads=2) as model:
        yield model


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and message.encode("utf-8"), message  # printable wherever it goes
    return message


# -- invalid text -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "problem"), [
    ("ab\ud800", r"the prompt holds a lone surrogate U\+D800 at position 2"),  # JSON "\ud800"
    ("ok\udcff", r"the prompt is not valid UTF-8 \(byte 0xff at position 2\); check your terminal"),  # argv
])
def test_describe_refuses_invalid_prompt_text(small, prompt, problem):
    before = small.images_encoded
    with pytest.raises(ConversationError, match=problem) as caught:
        small.describe(png_bytes(32, 32, 0), prompt, GREEDY)
    one_line(caught.value)
    assert small.images_encoded == before


def test_invalid_system_prompt_is_named(small):
    with pytest.raises(ConversationError, match="the system prompt is not valid UTF-8"):
        small.describe(png_bytes(32, 32, 0), "hi", GREEDY, system="\udc80")


@pytest.mark.parametrize(("messages", "problem"), [
    ([{"role": "user", "content": "fine"}, {"role": "assistant", "content": "x\ud83d"},
      {"role": "user", "content": "more"}], r"message 1: part 0: the text holds a lone surrogate U\+D83D"),
    ([{"role": "system", "content": [{"type": "text", "text": "\udfff"}]}, {"role": "user", "content": "q"}],
     r"message 0: part 0: the text holds a lone surrogate U\+DFFF at position 0"),
])
def test_every_message_text_is_checked(messages, problem):
    with pytest.raises(ConversationError, match=problem):
        normalize_messages(messages)


def test_a_message_object_checks_its_texts_when_built():
    with pytest.raises(ConversationError, match=r"part 1: the text is not valid UTF-8 \(byte 0xfe at position 0"):
        Message.user("ok", Text("\udcfe"))
    with pytest.raises(ConversationError, match=r"part 0: the text must be a str, not bytes"):
        Message.user(Text(b"hi"))  # type: ignore[arg-type]


def test_chat_with_invalid_text_raises_before_any_work(small):
    with pytest.raises(ConversationError, match="message 0: part 0"):
        small.chat([{"role": "user", "content": "\ud800"}], GREEDY)
    assert small.describe(png_bytes(32, 32, 1), "still fine", GREEDY).stats.generated_tokens >= 1


def test_paired_surrogates_are_not_text_python_accepts_but_emoji_is():
    normalize_messages([{"role": "user", "content": "a \U0001F600 and é"}])  # valid text passes
    with pytest.raises(ConversationError, match="U\\+D83D at position 2"):
        normalize_messages([{"role": "user", "content": "a \ud83d\ude00"}])  # a JSON pair not joined


@pytest.mark.parametrize(("fields", "problem"), [
    ({"stop": ("fine", "\udcff")}, r"stop string 1 is not valid UTF-8"),
    ({"stop": "\ud800"}, r"stop string 0 holds a lone surrogate"),
    ({"json_schema": {"enum": ["a", "b\ud800"]}}, r"the JSON schema\['enum'\]\[1\] holds a lone surrogate"),
    ({"json_schema": {"properties": {"\udcc3": {"type": "string"}}}},
     r"a key of the JSON schema\['properties'\] is not valid UTF-8 \(byte 0xc3"),
])
def test_generation_options_refuse_invalid_text(fields, problem):
    with pytest.raises(ConversationError, match=problem) as caught:
        GenerationOptions(**fields)
    one_line(caught.value)


def test_schema_text_check_is_not_recursive():
    deep: object = "\ud800"
    for _ in range(5000):  # far beyond Python's recursion limit
        deep = [deep]
    with pytest.raises(ConversationError, match=r"\[0\]\[0\]"):
        check_json_text(deep, "value")


def test_describe_with_a_bad_schema_value_through_option_fields(small):
    with pytest.raises(ConversationError, match="JSON schema"):
        small.describe(png_bytes(32, 32, 0), "hi", json_schema={"enum": ["\udcff"]})


# -- image sources ------------------------------------------------------------------------------------


def test_memoryview_is_one_image(small):
    data = png_bytes(48, 32, 2)
    as_bytes = small.describe(data, "What?", GREEDY)
    as_view = small.describe(memoryview(data), "What?", GREEDY)
    assert as_view.stats.image_tokens == as_bytes.stats.image_tokens == 2 * 4  # 3x2 patches, rows * (cols + 1)
    assert as_view.text == as_bytes.text


@pytest.mark.parametrize(("images", "error", "problem"), [
    ([], ConversationError, r"describe\(\) needs at least one image, got none; use chat\(\)"),
    ((), ConversationError, r"needs at least one image"),
    ("", ImageError, r"the image path is empty"),
    ([[b"nested"]], ImageError, r"part 0: cannot read an image from a list: pass a path"),
    ({"type": "image"}, ImageError, r"cannot read an image from a dict"),
    (42, ImageError, r"cannot read an image from a int"),
    (Path("a\0b.png"), ImageError, r"holds a NUL byte at position 1; no file can have that name"),
    ("photos/x\0.png", ImageError, r"NUL byte at position 8"),
])
def test_describe_refuses_what_is_not_an_image_source(small, images, error, problem):
    with pytest.raises(error, match=problem) as caught:
        small.describe(images, "What?", GREEDY)
    one_line(caught.value)


def test_symlink_loop_is_an_image_error(small, tmp_path):
    loop = tmp_path / "loop.png"
    os.symlink(tmp_path / "other.png", loop)
    os.symlink(loop, tmp_path / "other.png")
    with pytest.raises(ImageError, match="loop.png") as caught:
        small.describe(loop, "What?", GREEDY)
    one_line(caught.value)
    with pytest.raises(ImageError):
        small.describe(str(loop), "What?", GREEDY)


def test_a_file_url_with_an_encoded_nul_is_refused():
    with pytest.raises(ImageError, match="NUL byte"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": "file:///a%00b.png"}]}],
                           allow_local_files=True)


# -- prompts that cannot fit --------------------------------------------------------------------------


def test_a_prompt_too_long_is_refused_before_any_image_is_encoded(small):
    first, second = png_bytes(200, 160, 3), png_bytes(200, 160, 4)  # 13x10 patches: 139 positions + [IMG_END]
    before = small.images_encoded
    with pytest.raises(ContextLengthError,
                       match=r"needs \d+ positions \(278 for images\) but the context holds 256; raise the context "
                             r"size") as caught:
        small.describe([first, second], "What?", GREEDY)
    one_line(caught.value)
    assert small.images_encoded == before, "an image went through the vision encoder for nothing"


def test_cached_images_count_towards_the_context_too(small):
    first, second = png_bytes(200, 160, 5), png_bytes(200, 160, 6)
    small.describe(first, "What?", GREEDY)  # fits alone; its embedding is now cached
    before = small.images_encoded
    with pytest.raises(ContextLengthError, match=r"\(278 for images\)"):
        small.describe([first, second], "What?", GREEDY)
    assert small.images_encoded == before
    assert small.describe(second, "What?", GREEDY).stats.images_encoded == 1  # still usable


def test_the_same_image_twice_in_one_prompt_is_encoded_once(small):
    image = png_bytes(64, 48, 7)
    before = small.images_encoded
    answer = small.describe([image, image], "Same?", GREEDY)
    assert small.images_encoded == before + 1 and answer.stats.images_encoded == 1
    assert answer.stats.image_tokens == 2 * 3 * 5


def test_every_refusal_is_a_pixtral_error():
    image_of_a_number = {"role": "user", "content": [{"type": "image", "image": 3}]}
    for bad in ([{"role": "user", "content": "\ud800"}], [image_of_a_number]):
        with pytest.raises(PixtralError):
            normalize_messages(bad, allow_local_files=True)


# -- the call forms ------------------------------------------------------------------------------------

CHAT_PARAMETERS = ["self", "messages", "options", "cancel", "on_progress", "option_fields"]
DESCRIBE_PARAMETERS = ["self", "images", "prompt", "options", "system", "cancel", "on_progress", "option_fields"]


@pytest.mark.parametrize(("form", "returns"), [("", "Completion"), ("stream_", "Iterator[Chunk]"),
                                               ("astream_", "AsyncIterator[Chunk]")])
def test_every_form_shows_its_parameters_name_and_docstring(form, returns):
    import inspect

    from pixtral_cpp.defaults import DEFAULT_PROMPT

    for kind, names in (("chat", CHAT_PARAMETERS), ("describe", DESCRIBE_PARAMETERS)):
        method = getattr(PixtralModel, form + kind)
        signature = inspect.signature(method)
        assert list(signature.parameters) == names and signature.return_annotation == returns
        keyword_only = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert keyword_only == ["system", "cancel", "on_progress"][kind == "chat":]
        assert signature.parameters["options"].default is None
        assert method.__qualname__ == f"PixtralModel.{form}{kind}" and method.__doc__.strip()
    assert inspect.signature(PixtralModel.describe).parameters["prompt"].default == DEFAULT_PROMPT


def test_a_describe_form_refuses_a_bad_prompt_at_the_call_even_for_asyncio(small):
    with pytest.raises(ConversationError, match="the prompt holds a lone surrogate"):
        small.astream_describe(png_bytes(32, 32, 0), "\ud800")  # not only once iterated
