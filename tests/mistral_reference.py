"""mistral-common's side of the chat-format parity tests: conversations, requests, image layouts."""

from __future__ import annotations

from typing import Any

from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

BOS, IMG, IMG_BREAK, IMG_END = 1, 10, 12, 13
PATCH = 16

Part = str | Image.Image
Conversation = list[tuple[str, str | list[Part]]]


def picture(width: int, height: int, colour: str) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


TALL, WIDE, SQUAT = picture(32, 48, "red"), picture(64, 16, "green"), picture(48, 32, "blue")

CONVERSATIONS: dict[str, Conversation] = {
    "single_turn": [("user", "What is the capital of France?")],
    "system_then_two_user_turns": [
        ("system", "You are a helpful assistant. Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello! How can I help?"),
        ("user", ["Describe this image.", TALL]),  # image last: mistral-common moves it first
    ],
    "images_between_text": [("user", ["Compare this:", TALL, "with this:", WIDE, "Which one is wider?"])],
    "several_images_then_text": [("user", [TALL, WIDE, SQUAT, "Describe all three."])],
    "two_texts_then_image": [("user", ["First part.", "Second part.", SQUAT])],
    "image_turn_then_text_turn": [
        ("system", "Answer in French."),
        ("user", [TALL, "What colour is this?"]),
        ("assistant", "Rouge.  "),  # mistral-common drops trailing spaces
        ("user", "And the sky?"),
    ],
    "system_messages_between_user_runs": [
        ("system", "S1"),
        ("user", "a"),
        ("user", [WIDE]),  # merged with "a" into [text, image], then the image moves first
        ("system", "S2"),  # ends the user run, and joins S1 in the prompt of the last turn
        ("user", "b"),
    ],
    "image_only": [("user", [WIDE])],
    "system_before_text_first_turn": [("system", "Be concise."), ("user", ["Look:", SQUAT, "What is it?"])],
    "assistant_first": [("assistant", "I start."), ("user", "Fine.")],
}


def mistral_request(conversation: Conversation) -> ChatCompletionRequest:
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def chunk(item: Part) -> TextChunk | ImageChunk:
        return TextChunk(text=item) if isinstance(item, str) else ImageChunk(image=item)

    return ChatCompletionRequest(messages=[
        classes[role](content=content if isinstance(content, str) else [chunk(p) for p in content])
        for role, content in conversation
    ])


def with_image_layouts(ids: list[int]) -> list[Any]:
    """mistral-common's ids with each [IMG]/[IMG_BREAK] run replaced by its (rows, cols) layout."""
    sequence: list[Any] = []
    run: list[int] = []
    for token in ids:
        if token in (IMG, IMG_BREAK):
            run.append(token)
            continue
        if token == IMG_END:
            rows = run.count(IMG_BREAK) + 1
            cols = run.count(IMG) // rows
            assert run == ([IMG] * cols + [IMG_BREAK]) * (rows - 1) + [IMG] * cols
            sequence.append(("image", rows, cols))
            run = []
        sequence.append(token)
    assert run == []
    return sequence
