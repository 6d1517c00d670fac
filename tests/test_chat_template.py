"""The chat template, rendered like MTMDChatHandler and tokenized like mtmd, gives mistral-common's ids."""

from __future__ import annotations

import math
from typing import Any

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from pixtral_cpp.backend import llama_cpp_python
from pixtral_cpp.backend.chat_template import apply_builtin_chat_template
from pixtral_cpp.convert.chat_template import MEDIA_MARKER, PIXTRAL_CHAT_TEMPLATE, render_chat
from pixtral_cpp.convert.tokenizer import load_tekken
from pixtral_cpp.synthetic.tekken import real_tekken_path
from tests.mistral_reference import (
    BOS,
    CONVERSATIONS,
    IMG_END,
    PATCH,
    TALL,
    WIDE,
    Conversation,
    Part,
    mistral_request,
    with_image_layouts,
)
from tests.vocab_gguf import write_vocab_gguf

# llama-cpp-python's own chat handlers are the reference here.
llama_cpp = llama_cpp_python()
Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter
MTMDChatHandler = llama_cpp.llama_chat_format.MTMDChatHandler


def openai_messages(conversation: Conversation) -> list[dict[str, Any]]:
    def part(item: Part) -> dict[str, Any]:
        if isinstance(item, str):
            return {"type": "text", "text": item}
        return {"type": "image_url", "image_url": {"url": f"file:///image-{id(item)}.png"}}

    return [{"role": role, "content": content if isinstance(content, str) else [part(p) for p in content]}
            for role, content in conversation]


def reference_layout(image: Image.Image) -> tuple[str, int, int]:
    """(rows, cols) of patches mistral-common gives a small image: the size rounded up to 16."""
    return ("image", math.ceil(image.height / PATCH), math.ceil(image.width / PATCH))


def images_in_handler_order(conversation: Conversation) -> list[Image.Image]:
    # MTMDChatHandler.get_image_urls collects image parts of user messages in message order.
    return [p for role, content in conversation if role == "user" and not isinstance(content, str)
            for p in content if isinstance(p, Image.Image)]


def mtmd_sequence(llama: llama_cpp.Llama, text: str, images: list[Image.Image]) -> list[Any]:
    """What mtmd feeds the model: BOS, text pieces tokenized apart, each image followed by [IMG_END]."""
    pieces = text.split(MEDIA_MARKER)
    assert len(pieces) == len(images) + 1
    sequence: list[Any] = [BOS]
    for index, piece in enumerate(pieces):
        if index:
            sequence += [reference_layout(images[index - 1]), IMG_END]
        sequence += llama.tokenize(piece.encode("utf-8"), add_bos=False, special=True)
    return sequence


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> llama_cpp.Llama:
    path = tmp_path_factory.mktemp("chat") / "vocab.gguf"
    write_vocab_gguf(load_tekken(real_tekken_path()), path, chat_template=PIXTRAL_CHAT_TEMPLATE)
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def mistral_tokenizer() -> MistralTokenizer:
    return MistralTokenizer.from_file(real_tekken_path())


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_tokens_match_mistral_common(name: str, llama: llama_cpp.Llama,
                                     mistral_tokenizer: MistralTokenizer) -> None:
    conversation = CONVERSATIONS[name]
    text = render_chat(openai_messages(conversation))
    ours = mtmd_sequence(llama, text, images_in_handler_order(conversation))
    reference = mistral_tokenizer.encode_chat_completion(mistral_request(conversation))
    expected = with_image_layouts(reference.tokens)
    assert ours == expected
    assert "<s>" not in text and ours.count(BOS) == 1  # mtmd adds the only BOS


TEXT_ONLY = [name for name, conversation in CONVERSATIONS.items()
             if all(isinstance(content, str) for _, content in conversation)]


@pytest.mark.parametrize("name", TEXT_ONLY)
def test_text_only_formatter_gets_one_bos(name: str, llama: llama_cpp.Llama,
                                          mistral_tokenizer: MistralTokenizer) -> None:
    """Without an mmproj llama-cpp-python uses Jinja2ChatFormatter: bos_token "<s>" and no added BOS."""
    conversation = CONVERSATIONS[name]
    formatter = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"],
        eos_token=llama.detokenize([llama.token_eos()], special=True).decode(),
        bos_token=llama.detokenize([llama.token_bos()], special=True).decode(),
    )
    result = formatter(messages=openai_messages(conversation))
    ids = llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
    assert result.prompt.startswith("<s>[INST]")
    assert ids == mistral_tokenizer.encode_chat_completion(mistral_request(conversation)).tokens


def test_render_matches_the_handler(llama: llama_cpp.Llama) -> None:
    """Render with the handler's own message conversion, Jinja setup and template source (GGUF metadata)."""
    template = llama.metadata["tokenizer.chat_template"]
    assert template == PIXTRAL_CHAT_TEMPLATE
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    for conversation in CONVERSATIONS.values():
        messages = openai_messages(conversation)
        handler_messages = [MTMDChatHandler._convert_message_for_template(m, MEDIA_MARKER) for m in messages]
        rendered = environment.from_string(template).render(
            messages=handler_messages, add_generation_prompt=True, bos_token="", eos_token="")
        assert rendered == render_chat(messages)


def test_rendered_prompts_read_as_expected() -> None:
    image = {"type": "image_url", "image_url": {"url": "a.png"}}
    text = {"type": "text", "text": "Describe this"}
    assert render_chat([{"role": "user", "content": [text, image]}]) == (
        "[INST]<__media__>Describe this[/INST]")
    assert render_chat([{"role": "user", "content": [text, image, text]}]) == (
        "[INST]Describe this<__media__>Describe this[/INST]")  # only [text, image] is reordered
    assert render_chat([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [text, image]},
    ]) == "[INST]Hi[/INST]Hello!</s>[INST]Be brief.\n\n<__media__>Describe this[/INST]"


def test_template_is_jinja_not_a_template_name() -> None:
    assert PIXTRAL_CHAT_TEMPLATE.strip() != "mistral-v3-tekken"
    assert MEDIA_MARKER in PIXTRAL_CHAT_TEMPLATE and "<s>" not in PIXTRAL_CHAT_TEMPLATE
    rendered = render_chat(openai_messages(CONVERSATIONS["several_images_then_text"]))
    assert rendered.count(MEDIA_MARKER) == 3


@pytest.mark.parametrize(("messages", "problem"), [
    ([{"role": "tool", "content": "42", "tool_call_id": "a"}], "no role 'tool'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
      "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "tool calls are not supported"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}],
     "only user messages can hold images"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "'input_audio'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], "needs text content"),
])
def test_unsupported_conversations_raise(messages: list[dict[str, Any]], problem: str) -> None:
    with pytest.raises(jinja2.TemplateError, match=problem):
        render_chat(messages)


def test_vocab_gguf_fixture_is_the_real_vocabulary(llama: llama_cpp.Llama) -> None:
    assert llama.n_vocab() == 131072
    assert llama.tokenize(b"[IMG_END]", add_bos=False, special=True) == [IMG_END]


# --- Other tools: llama.cpp's non-Jinja route and llama-server's messages (docs/other-tools.md) --------------

# Conversations llama.cpp's built-in mistral-v3-tekken format renders as mistral-common does: string turns
# (images as mtmd markers before the text, as llama-mtmd-cli puts them), a system prompt only before a
# single user turn, no trailing spaces in assistant turns.
BUILTIN_FAITHFUL: dict[str, Conversation] = {
    "single_turn": CONVERSATIONS["single_turn"],
    "image_only": CONVERSATIONS["image_only"],
    "several_images_then_text": CONVERSATIONS["several_images_then_text"],
    "images_between_text": CONVERSATIONS["images_between_text"],
    "system_then_image_and_text": [("system", "Be concise."), ("user", [TALL, "What is it?"])],
    "two_turns": [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", [WIDE, "And this?"])],
    "three_text_turns": [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
}


def builtin_messages(conversation: Conversation) -> list[tuple[str, str]]:
    """(role, text) pairs as llama.cpp's legacy route receives them: images as mtmd's marker, in place."""
    return [(role, content if isinstance(content, str)
             else "".join(MEDIA_MARKER if isinstance(p, Image.Image) else p for p in content))
            for role, content in conversation]


def test_llama_cpp_takes_the_template_for_mistral_v3_tekken() -> None:
    """llama_chat_apply_template with the template's source renders exactly its mistral-v3-tekken format,
    not llama2's spaced "[INST] ... [/INST]" (what it took before: docs/other-tools.md)."""
    for conversation in [*BUILTIN_FAITHFUL.values(), *CONVERSATIONS.values()]:
        messages = builtin_messages(conversation)
        ours = apply_builtin_chat_template(PIXTRAL_CHAT_TEMPLATE, messages)
        assert ours == apply_builtin_chat_template("mistral-v3-tekken", messages)
        assert ours != apply_builtin_chat_template("llama2", messages)
    assert apply_builtin_chat_template(PIXTRAL_CHAT_TEMPLATE, [("user", "Hi")]) == "[INST]Hi[/INST]"


@pytest.mark.parametrize("name", BUILTIN_FAITHFUL)
def test_builtin_route_gives_mistral_common_tokens(name: str, llama: llama_cpp.Llama,
                                                   mistral_tokenizer: MistralTokenizer) -> None:
    """llama-mtmd-cli without --jinja: the C++ rendering equals the Jinja one and mistral-common's ids."""
    conversation = BUILTIN_FAITHFUL[name]
    builtin = apply_builtin_chat_template(PIXTRAL_CHAT_TEMPLATE, builtin_messages(conversation))
    assert builtin == render_chat(openai_messages(conversation))
    reference = mistral_tokenizer.encode_chat_completion(mistral_request(conversation))
    assert mtmd_sequence(llama, builtin, images_in_handler_order(conversation)) == with_image_layouts(
        reference.tokens)


def test_builtin_route_differences_are_the_documented_ones() -> None:
    """Where the C++ format departs from mistral-common (docs/other-tools.md): a system prompt stays where it
    is instead of joining the last user turn, assistant text keeps its trailing spaces, and an image given
    after the text stays there."""
    def both(conversation: Conversation) -> tuple[str, str]:
        return (apply_builtin_chat_template(PIXTRAL_CHAT_TEMPLATE, builtin_messages(conversation)),
                render_chat(openai_messages(conversation)))

    system_first = [("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")]
    assert both(system_first) == ("[INST]S\n\na[/INST]b</s>[INST]c[/INST]", "[INST]a[/INST]b</s>[INST]S\n\nc[/INST]")
    assert both([("user", "a"), ("assistant", "b  "), ("user", "c")]) == (
        "[INST]a[/INST]b  </s>[INST]c[/INST]", "[INST]a[/INST]b</s>[INST]c[/INST]")
    assert both([("user", ["Describe", WIDE])]) == (
        "[INST]Describe<__media__>[/INST]", "[INST]<__media__>Describe[/INST]")


# llama-server (tools/server, get_media_marker): "<__media_" + 32 random letters or digits + "__>".
SERVER_MARKER = "<__media_Qx7PmA0kZ3bR9sT1uV5wY2cD8eF4gH6j__>"


def server_messages(conversation: Conversation, marker: str = SERVER_MARKER) -> list[dict[str, Any]]:
    """What llama-server hands the template (common_chat_msg::to_json_oaicompat): a message holding an image
    becomes one string, its text parts joined by a line break, markers with nothing around them."""
    messages = []
    for role, content in conversation:
        if not isinstance(content, str):
            text, previous_was_text = "", False
            for item in content:
                if isinstance(item, Image.Image):
                    text, previous_was_text = text + marker, False
                else:
                    text, previous_was_text = text + ("\n" if previous_was_text else "") + item, True
            content = text
        messages.append({"role": role, "content": content})
    return messages


SERVER_FAITHFUL = [name for name in CONVERSATIONS if name != "two_texts_then_image"]


@pytest.mark.parametrize("name", SERVER_FAITHFUL)
def test_server_messages_give_mistral_common_tokens(name: str, llama: llama_cpp.Llama,
                                                    mistral_tokenizer: MistralTokenizer) -> None:
    """The template finds llama-server's markers in text: [text, image] gets its image first there too."""
    conversation = CONVERSATIONS[name]
    rendered = render_chat(server_messages(conversation))
    assert rendered.count(SERVER_MARKER) == len(images_in_handler_order(conversation))
    ours = mtmd_sequence(llama, rendered.replace(SERVER_MARKER, MEDIA_MARKER), images_in_handler_order(conversation))
    reference = mistral_tokenizer.encode_chat_completion(mistral_request(conversation))
    assert ours == with_image_layouts(reference.tokens)


def test_server_text_then_image_is_moved_like_mistral_common() -> None:
    image = {"type": "image_url", "image_url": {"url": "a.png"}}
    text = {"type": "text", "text": "Describe this"}
    expected = f"[INST]{SERVER_MARKER}Describe this[/INST]"
    assert render_chat([{"role": "user", "content": "Describe this" + SERVER_MARKER}]) == expected
    assert render_chat([{"role": "user", "content": SERVER_MARKER + "Describe this"}]) == expected
    # a media_marker part (typed content) keeps its own marker
    assert render_chat([{"role": "user", "content": [text, {"type": "media_marker", "text": SERVER_MARKER}]}]) == (
        expected)
    assert render_chat([{"role": "user", "content": [text, image]}]) == "[INST]<__media__>Describe this[/INST]"


@pytest.mark.parametrize("text", ["a <__media_ b", "<__media_x", "x__>y<__media_", "<__media_>"])
def test_marker_lookalikes_stay_text(text: str) -> None:
    assert render_chat([{"role": "user", "content": text}]) == f"[INST]{text}[/INST]"


def test_server_joins_text_parts_with_one_line_break() -> None:
    """The documented limitation: llama-server joins the text parts of a message holding an image with "\\n",
    mistral-common with "\\n\\n", before the template sees them."""
    conversation = CONVERSATIONS["two_texts_then_image"]
    assert render_chat(server_messages(conversation)) == f"[INST]{SERVER_MARKER}First part.\nSecond part.[/INST]"
    assert render_chat(openai_messages(conversation)) == "[INST]<__media__>First part.\n\nSecond part.[/INST]"
