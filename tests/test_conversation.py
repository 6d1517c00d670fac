"""The runtime's prompt builder gives mistral-common's token ids, with llama.cpp's real tekken vocabulary."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image as PILImage

from pixtral_cpp.backend.text import TextModel, TextModelOptions
from pixtral_cpp.conversation import (
    Image,
    ImageSlot,
    Message,
    PromptPlan,
    SpecialTokens,
    Text,
    build_prompt,
    normalize_messages,
    resolve_image_source,
)
from pixtral_cpp.errors import ConversationError, ImageError, PixtralError
from pixtral_cpp.images import pixtral_geometry
from pixtral_cpp.synthetic.tekken import real_tekken_path
from tests.mistral_reference import (
    CONVERSATIONS,
    SQUAT,
    TALL,
    WIDE,
    Conversation,
    mistral_request,
    picture,
    with_image_layouts,
)

# Cases beyond the template's (tests/mistral_reference.py), some of which a Jinja template cannot get right.
EXTRA_CONVERSATIONS: dict[str, Conversation] = {
    "consecutive_user_messages": [
        ("user", "First."), ("user", ["Second.", TALL, "Third."]), ("user", "Fourth."),
    ],
    "two_system_messages_and_history": [
        ("system", "S1"), ("system", "S2"), ("user", [SQUAT, "What is it?"]), ("assistant", "A box."),
        ("user", "Sure?"),
    ],
    # Typed text is text: never [INST], </s>, <s> or [IMG_END] control tokens, in any role.
    "literal_control_text": [
        ("system", "Never say [/INST]."), ("user", "Say [INST] and </s> literally."),
        ("assistant", "[INST] </s> <s>"), ("user", ["<s>[IMG_END][IMG]", WIDE]),
    ],
    # With images, mistral-common tokenizes the system prompt apart from text that starts with a newline.
    "system_then_text_starting_with_newline": [
        ("system", "Be brief."), ("user", ["\nWhat?", SQUAT, "\nAnd?"]),
    ],
    "system_after_last_user": [("user", "a"), ("assistant", "b"), ("user", "c"), ("system", "late")],
    "only_system": [("system", "Just this.")],
    "assistant_only_spaces_and_empty_parts": [
        ("user", ["", TALL, ""]), ("assistant", "   "),
        ("assistant", "Then this.\n "), ("user", "ok"),  # rstrip(" ") keeps the "\n"
    ],
    "empty_system_text_chunk": [("system", [""]), ("system", "T"), ("user", "c")],  # mistral-common: "\n\nT"
    "same_image_twice_text_between": [("user", [WIDE, "vs", WIDE])],
}
ALL_CONVERSATIONS = {**CONVERSATIONS, **EXTRA_CONVERSATIONS}


@pytest.fixture(scope="module")
def text_model(converted: Any) -> Iterator[TextModel]:
    text_path, _ = converted("F32")  # a tiny model with Pixtral's real tekken vocabulary
    with TextModel(text_path, TextModelOptions(n_ctx=64)) as model:
        yield model


@pytest.fixture(scope="module")
def specials(text_model: TextModel) -> SpecialTokens:
    return SpecialTokens.from_model(text_model)


@pytest.fixture(scope="module")
def mistral_tokenizer() -> MistralTokenizer:
    return MistralTokenizer.from_file(real_tekken_path())


def openai_dicts(conversation: Conversation) -> list[dict[str, Any]]:
    def part(item: str | PILImage.Image) -> dict[str, Any]:
        return {"type": "text", "text": item} if isinstance(item, str) else {"type": "image", "image": item}

    return [{"role": role, "content": content if isinstance(content, str) else [part(p) for p in content]}
            for role, content in conversation]


def plan_for(conversation: Conversation, model: TextModel, specials: SpecialTokens) -> PromptPlan:
    messages = normalize_messages(openai_dicts(conversation))
    return build_prompt(messages, lambda text: model.tokenize(text, add_special=False), specials)


def with_geometry(plan: PromptPlan) -> list[Any]:
    """The plan's ids with each image slot as ("image", rows, cols) from pixtral_geometry."""
    sequence: list[Any] = []
    for item in plan.items:
        if isinstance(item, ImageSlot):
            source = plan.images[item.index].source
            geometry = pixtral_geometry(source.width, source.height)
            sequence.append(("image", geometry.rows, geometry.cols))
        else:
            sequence.extend(item)
    return sequence


def image_positions(plan: PromptPlan) -> list[int]:
    # backend.vision.ImageEmbedding.n_positions: the geometry's positions less the [IMG_END] token
    return [pixtral_geometry(image.source.width, image.source.height).n_image_positions - 1
            for image in plan.images]


def assert_well_formed(plan: PromptPlan, specials: SpecialTokens) -> None:
    """Runs and slots alternate, every slot is followed by [IMG_END], slots number the images in order."""
    items = plan.items
    assert isinstance(items[0], tuple) and items[0][:2] == (specials.bos, specials.inst)
    assert isinstance(items[-1], tuple) and items[-1][-1] == specials.inst_end
    for before, after in zip(items, items[1:], strict=False):
        assert isinstance(before, ImageSlot) != isinstance(after, ImageSlot)
        if isinstance(before, ImageSlot):
            assert after[0] == specials.img_end  # type: ignore[index]
    slots = [item.index for item in items if isinstance(item, ImageSlot)]
    assert slots == list(range(len(plan.images)))
    assert sum(item.count(specials.bos) for item in items if isinstance(item, tuple)) == 1


@pytest.mark.parametrize("name", ALL_CONVERSATIONS)
def test_plan_matches_mistral_common(name: str, text_model: TextModel, specials: SpecialTokens,
                                     mistral_tokenizer: MistralTokenizer) -> None:
    conversation = ALL_CONVERSATIONS[name]
    plan = plan_for(conversation, text_model, specials)
    reference = mistral_tokenizer.encode_chat_completion(mistral_request(conversation))
    assert with_geometry(plan) == with_image_layouts(reference.tokens)
    assert_well_formed(plan, specials)
    pictures = [p for _, content in conversation if not isinstance(content, str)
                for p in content if not isinstance(p, str)]
    assert [image.source for image in plan.images] == pictures  # each slot gets its own image, in order
    assert plan.n_positions(image_positions(plan)) == len(reference.tokens)
    for image, pixels in zip(plan.images, reference.images, strict=True):  # (3, H, W) as mistral-common resized it
        geometry = pixtral_geometry(image.source.width, image.source.height)
        assert pixels.shape[1:] == (geometry.rows * 16, geometry.cols * 16)


def test_control_text_stays_text(text_model: TextModel, specials: SpecialTokens) -> None:
    plan = plan_for([("user", "[INST]</s>")], text_model, specials)
    (run,) = plan.items
    assert run[:2] == (specials.bos, specials.inst) and run[-1] == specials.inst_end
    body = run[2:-1]
    assert specials.inst not in body and specials.eos not in body
    assert text_model.detokenize(list(body)) == "[INST]</s>"


def test_special_tokens_from_model(text_model: TextModel) -> None:
    assert SpecialTokens.from_model(text_model) == SpecialTokens(bos=1, inst=3, inst_end=4, eos=2, img_end=13)


def test_message_objects_give_the_same_plan(text_model: TextModel, specials: SpecialTokens) -> None:
    messages = [Message.system("Be brief."), Message.user("Compare", TALL, "with", Image(WIDE)),
                Message.assistant("Tall vs wide."), Message.user("", "And now?")]
    conversation: Conversation = [("system", "Be brief."), ("user", ["Compare", TALL, "with", WIDE]),
                                  ("assistant", "Tall vs wide."), ("user", "And now?")]
    tokenize = lambda text: text_model.tokenize(text, add_special=False)  # noqa: E731
    assert messages[1].parts[:2] == (Text("Compare"), messages[1].parts[1])
    assert build_prompt(normalize_messages(messages), tokenize, specials).items == (
        plan_for(conversation, text_model, specials).items)


def test_positions_need_one_count_per_image(text_model: TextModel, specials: SpecialTokens) -> None:
    plan = plan_for([("user", [TALL, WIDE])], text_model, specials)
    with pytest.raises(ValueError, match="2 images"):
        plan.n_positions([5])


# ---------------------------------------------------------------------------------------------------
# normalize_messages


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    picture(20, 10, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_dict_forms(tmp_path: Path) -> None:
    data = png_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    array = np.zeros((4, 4, 3), np.uint8)
    messages = normalize_messages([
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "image_url", "image_url": str(path)},
            {"type": "image_url", "image_url": {"url": path.as_uri(), "detail": "high"}},
            {"type": "image", "image": array},
            Text("typed"),
        ]},
        {"role": "assistant", "content": None, "name": "bot"},
        {"role": "user", "content": ""},
    ], allow_local_files=True)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].parts == (Text("sys"),) and messages[2].parts == () and messages[3].parts == ()
    parts = messages[1].parts
    assert parts[0] == Text("look") and parts[5] == Text("typed")
    sources = [part.source for part in parts[1:5] if isinstance(part, Image)]
    assert sources[0] == data and sources[1] == path == sources[2] and sources[3] is array
    assert isinstance(sources[1], Path) and isinstance(sources[2], Path)


def test_data_url_with_wrapped_lines_decodes() -> None:
    data = png_bytes()
    encoded = base64.b64encode(data).decode()
    wrapped = "\n".join(encoded[i:i + 20] for i in range(0, len(encoded), 20))
    assert resolve_image_source("data:image/png;base64," + wrapped) == data


def test_image_strings_in_message_objects_are_resolved_too() -> None:
    url = "data:image/png;base64," + base64.b64encode(b"xyz").decode()
    (message,) = normalize_messages([Message.user("hi", Image(url))])
    assert message.parts[1].source == b"xyz"  # type: ignore[union-attr]
    with pytest.raises(ImageError, match=r"message 0: part 0: local image files are not allowed"):
        normalize_messages([Message.user(Path("secret.png"))])


@pytest.mark.parametrize(("url", "problem"), [
    ("https://example.com/cat.png", r"message 1: part 1: remote image URLs are not fetched \(https://exa"),
    ("http://example.com/cat.png", "never uses the network"),
    ("/etc/passwd", "local image files are not allowed here"),
    ("file:///etc/passwd", "local image files are not allowed here"),
    ("ftp://example.com/cat.png", "unsupported image URL"),
    ("data:image/png;base64,@@@not base64", "invalid base64"),
    ("data:image/png,%89PNG", "must be 'data:<type>;base64,<data>'"),
])
def test_refused_image_urls(url: str, problem: str) -> None:
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "t"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(ImageError, match=problem):
        normalize_messages(messages)


@pytest.mark.parametrize(("messages", "problem"), [
    ([], "the conversation is empty"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "message 1: the conversation ends with an assistant message"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "tool", "content": "42"}],
     r"message 2: unknown role 'tool'; expected one of system, user, assistant"),
    ([{"content": "no role"}], "message 0: unknown role None"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "input_audio"}]}],
     r"message 0: part 1: unsupported part of type 'input_audio'; expected \{'type': 'text'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "message 0: part 0: unsupported part of type 'text'"),
    ([{"role": "user", "content": ["bare string"]}], "message 0: part 0: a part must be a dict"),
    ([{"role": "user", "content": 42}], "message 0: content must be a string or a list of parts"),
    (["hello"], "message 0: expected a Message or a dict"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "image", "image": b"png"}]},
      {"role": "user", "content": "q"}],
     "message 1: only user messages can hold images, not assistant messages"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
      {"role": "user", "content": "q"}], "message 1: tool calls are not supported"),
])
def test_bad_conversations_name_the_message(messages: list[Any], problem: str) -> None:
    with pytest.raises(ConversationError, match=problem) as caught:
        normalize_messages(messages)
    assert isinstance(caught.value, PixtralError)


def test_empty_assistant_turn_is_refused() -> None:
    specials = SpecialTokens(bos=1, inst=3, inst_end=4, eos=2, img_end=13)
    messages = [Message.user("q"), Message.assistant(), Message.assistant(""), Message.user("again")]
    with pytest.raises(ConversationError, match="message 1: an assistant message needs text content"):
        build_prompt(messages, lambda text: [0] * len(text), specials)


def test_message_validation() -> None:
    with pytest.raises(ConversationError, match="unknown role 'tool'"):
        Message("tool", ())  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match="only user messages can hold images, not system"):
        Message("system", (Image(b"png"),))
    with pytest.raises(ConversationError, match="must be Text or Image, not str"):
        Message("user", ("text",))  # type: ignore[arg-type]
    message = Message("user", [Text("a"), Image(np.zeros((2, 2), np.uint8))])  # type: ignore[arg-type]
    assert isinstance(message.parts, tuple) and len(message.parts) == 2
    text, image = Message.user("a", "", b"png").parts  # the empty string is dropped, bytes are an image
    assert text == Text("a") and isinstance(image, Image) and image.source == b"png"
