"""Chat messages and the prompt Pixtral expects, built token by token as mistral-common does.

The runtime does not render a Jinja template: text a user types is tokenized as plain text, so
"[INST]" or "</s>" inside a message never becomes a control token (mistral-common behaves the same).
The rules are those of mistral-common 1.13.1 (tokenizer v3, tekken), also listed in
convert/chat_template.py:

* one BOS, `[INST]user[/INST]` per user turn and `assistant</s>` per assistant turn, no spaces;
* consecutive messages of one role form one turn; their non-empty text parts, adjacent within the turn,
  are joined with a blank line; a system message ends such a run;
* all system messages, joined with a blank line, go before the LAST user turn, followed by a blank
  line; tokenized together with the turn's text when the turn has no image, on their own otherwise;
* each text part is tokenized on its own; an image sits where it appears, followed by `[IMG_END]`;
* a user turn that is exactly [text, image] has its image moved first;
* an empty user turn is inserted if the conversation does not start with one;
* assistant text loses its trailing spaces.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
from PIL import Image as PILImage

from pixtral_cpp.errors import ConversationError, ImageError
from pixtral_cpp.images import ImageSource
from pixtral_cpp.valid_text import check_text

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)
TURN_SEPARATOR = "\n\n"  # mistral-common's _DEFAULT_JOIN_STR, for texts, messages and system prompts
_IMAGE_OBJECTS = (bytes, bytearray, PILImage.Image, np.ndarray)  # image sources that are not paths or URLs


# ---------------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Text:
    """A text part of a message."""

    text: str


@dataclass(frozen=True, eq=False)  # identity equality: a numpy source has no usable == or hash
class Image:
    """An image part of a user message; `source` is anything pixtral_cpp.images.load_image reads."""

    source: ImageSource = field(repr=False)


Part = Text | Image


@dataclass(frozen=True)
class Message:
    """One chat message: a role and its parts in order."""

    role: Role
    parts: tuple[Part, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConversationError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        object.__setattr__(self, "parts", tuple(self.parts))
        for number, part in enumerate(self.parts):
            if not isinstance(part, (Text, Image)):
                raise ConversationError(f"a message part must be Text or Image, not {type(part).__name__}")
            if isinstance(part, Image) and self.role != "user":
                raise ConversationError(f"only user messages can hold images, not {self.role} messages")
            if isinstance(part, Text):
                _check_part_text(number, part)

    @classmethod
    def user(cls, *content: str | Part | ImageSource) -> Message:
        """A user message: strings are text, anything else an image (a path must be a Path or Image)."""
        return cls("user", _as_parts(content))

    @classmethod
    def system(cls, *content: str | Text) -> Message:
        """A system message; its texts are joined with a blank line."""
        return cls("system", _as_parts(content))

    @classmethod
    def assistant(cls, *content: str | Text) -> Message:
        """An earlier answer of the model."""
        return cls("assistant", _as_parts(content))


def _check_part_text(number: int, part: Text) -> None:
    # Every text of every message passes here: the one check before the tokenizer sees text.
    check_text(part.text, f"part {number}: the text")


def _as_parts(content: Iterable[str | Part | ImageSource]) -> tuple[Part, ...]:
    # Empty strings are dropped, as mistral-common drops empty string content.
    return tuple(item if isinstance(item, (Text, Image)) else Text(item) if isinstance(item, str)
                 else Image(item) for item in content if not isinstance(item, str) or item)


# ---------------------------------------------------------------------------------------------------
# OpenAI-style input


def normalize_messages(messages: Iterable[Message | Mapping[str, Any]], *,
                       allow_local_files: bool = False) -> list[Message]:
    """Messages from Message objects or OpenAI-style dicts, with every image source resolved.

    Image strings may be base64 data URLs (decoded here), file:// URLs or plain paths (only with
    `allow_local_files`, since a server must not read its own disk for a client); http(s) URLs are
    refused because pixtral-cpp never goes to the network.
    """
    result = []
    for index, message in enumerate(messages):
        try:
            if not isinstance(message, Message):
                message = _message_from_dict(message)
            result.append(_resolve_images(message, allow_local_files))
        except ConversationError as error:
            raise ConversationError(f"message {index}: {error}") from None
        except ImageError as error:
            raise ImageError(f"message {index}: {error}") from None
    check_answerable(result)
    return result


def check_answerable(messages: Sequence[Message]) -> None:
    """Refuse a conversation with nothing to answer: empty, or ending with the model's own answer."""
    if not messages:
        raise ConversationError("the conversation is empty; it needs at least one user message")
    if messages[-1].role == "assistant":
        raise ConversationError(f"message {len(messages) - 1}: the conversation ends with an assistant "
                                "message; add a user message for the model to answer")


def _message_from_dict(message: Mapping[str, Any]) -> Message:
    if not isinstance(message, Mapping):
        raise ConversationError(f"expected a Message or a dict with 'role' and 'content', "
                                f"got {type(message).__name__}")
    role = message.get("role")  # Message checks it
    if message.get("tool_calls"):
        raise ConversationError("tool calls are not supported by Pixtral's chat format")
    content = message.get("content")
    if content is None or isinstance(content, str):
        # mistral-common skips empty string content, but keeps an empty text chunk of a list
        return Message(role, (Text(content),) if content else ())
    if not isinstance(content, Sequence):
        raise ConversationError(f"content must be a string or a list of parts, not {type(content).__name__}")
    return Message(role, tuple(_part_from_dict(number, part) for number, part in enumerate(content)))


def _part_from_dict(number: int, part: object) -> Part:
    if isinstance(part, (Text, Image)):
        return part
    if not isinstance(part, Mapping):
        raise ConversationError(f"part {number}: a part must be a dict with a 'type', "
                                f"not a {type(part).__name__}")
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return Text(part["text"])
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if isinstance(url, str):
            return Image(url)
    if kind == "image" and part.get("image") is not None:
        return Image(part["image"])
    raise ConversationError(
        f"part {number}: unsupported part of type {kind!r}; expected {{'type': 'text', 'text': str}}, "
        "{'type': 'image_url', 'image_url': {'url': str}} or {'type': 'image', 'image': <image>}")


def _resolve_images(message: Message, allow_local_files: bool) -> Message:
    parts = []
    for number, part in enumerate(message.parts):
        if isinstance(part, Image):
            try:
                part = Image(resolve_image_source(part.source, allow_local_files=allow_local_files))
            except ImageError as error:
                raise ImageError(f"part {number}: {error}") from None
        parts.append(part)
    return Message(message.role, tuple(parts))


def resolve_image_source(source: ImageSource, *, allow_local_files: bool = False) -> ImageSource:
    """Decode a data URL to bytes, turn file:// URLs into paths; refuse remote and unwanted local ones."""
    if isinstance(source, str) and source.startswith("data:"):
        return _decode_data_url(source)
    if isinstance(source, str) and "://" in source:
        url = urllib.parse.urlsplit(source)
        if url.scheme in ("http", "https"):
            raise ImageError(f"remote image URLs are not fetched ({url.scheme}://{url.netloc}/...): "
                             "pixtral-cpp never uses the network; pass the image's bytes or a data: URL")
        if url.scheme != "file" or url.netloc not in ("", "localhost"):
            raise ImageError(f"unsupported image URL {source[:60]!r}: use a data: URL, file:// URL or path")
        source = Path(urllib.request.url2pathname(url.path))
    if isinstance(source, (str, os.PathLike)):
        if not allow_local_files:
            raise ImageError(f"local image files are not allowed here ({str(source)[:60]!r}); pass the image "
                             "as a data: URL or bytes")
        return _local_path(source)
    if isinstance(source, memoryview):
        return source.tobytes()  # one image's bytes (a memoryview is also a Sequence: never a list here)
    if not isinstance(source, _IMAGE_OBJECTS):
        raise ImageError(f"cannot read an image from a {type(source).__name__}: pass a path, bytes, a data: URL, "
                         "a PIL image or a numpy array, one per image")
    return source


def _local_path(source: str | os.PathLike[str]) -> Path:
    """The path of a local image, refusing names no file system can hold before anything stats them."""
    name = os.fspath(source)
    if not isinstance(name, str):
        raise ImageError(f"an image path must be text, not {type(name).__name__} (bytes are taken as image data)")
    if not name:
        raise ImageError("the image path is empty")
    nul = name.find("\0")
    if nul >= 0:
        raise ImageError(f"the image path {name[:60]!r} holds a NUL byte at position {nul}; "
                         "no file can have that name")
    return Path(name)


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError(f"image data URL must be 'data:<type>;base64,<data>', got {url[:40]!r}...")
    try:
        # Whitespace is dropped first: some clients wrap long base64 lines.
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"image data URL holds invalid base64 ({error})") from None


# ---------------------------------------------------------------------------------------------------
# Prompt


class Vocabulary(Protocol):
    def token_id(self, piece: str) -> int: ...


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the control tokens the chat format uses."""

    bos: int
    inst: int
    inst_end: int
    eos: int
    img_end: int

    @classmethod
    def from_model(cls, model: Vocabulary) -> SpecialTokens:
        """Look the ids up by name in a model's vocabulary (e.g. a backend.text.TextModel)."""
        return cls(bos=model.token_id("<s>"), inst=model.token_id("[INST]"),
                   inst_end=model.token_id("[/INST]"), eos=model.token_id("</s>"),
                   img_end=model.token_id("[IMG_END]"))


@dataclass(frozen=True)
class ImageSlot:
    """Where image `index` of PromptPlan.images goes; the next token is always [IMG_END]."""

    index: int


PromptItem = tuple[int, ...] | ImageSlot


@dataclass(frozen=True)
class PromptPlan:
    """A prompt as runs of token ids and image slots, in order, and the images the slots refer to."""

    items: tuple[PromptItem, ...]
    images: tuple[Image, ...]

    def n_positions(self, image_positions: Sequence[int]) -> int:
        """Context positions the prompt takes, given each image's embedding positions ([IMG_END] excluded)."""
        if len(image_positions) != len(self.images):
            raise ValueError(f"need a position count for each of the {len(self.images)} images")
        return sum(image_positions[item.index] if isinstance(item, ImageSlot) else len(item)
                   for item in self.items)


@dataclass(frozen=True)
class _Turn:
    role: Role
    parts: tuple[Part, ...]  # non-empty texts merged, so no two Text parts are adjacent
    first_message: int  # index of the turn's first message, for error messages


def build_prompt(messages: Sequence[Message], tokenize: Callable[[str], list[int]],
                 specials: SpecialTokens, known_answers: Mapping[str, Sequence[int]] | None = None) -> PromptPlan:
    """mistral-common's v3-tekken chat sequence for `messages`.

    `tokenize` encodes plain text without BOS and without parsing control tokens (TextModel.tokenize
    with add_special=False, parse_special=False). `known_answers` maps answers this model generated to
    the tokens it generated: an assistant turn with exactly that text keeps those tokens, which are in
    the KV cache already (tokenizing the text again need not give the same tokens).
    """
    check_answerable(messages)
    system_prompt = _system_prompt(messages)
    turns = _merge_turns(messages)
    if not turns or turns[0].role != "user":  # e.g. only system messages, or the assistant first
        turns.insert(0, _Turn("user", (), 0))
    last_user = max(i for i, turn in enumerate(turns) if turn.role == "user")

    def encode(text: str) -> list[int]:
        return tokenize(text) if text else []

    sequence: list[int | Image] = [specials.bos]
    for number, turn in enumerate(turns):
        if turn.role == "user":
            system = system_prompt if number == last_user else ""
            content = _user_content(turn.parts, system, encode, specials)
            sequence += [specials.inst, *content, specials.inst_end]
        else:
            answer = _assistant_text(turn).rstrip(" ")  # rstrips spaces only
            known = (known_answers or {}).get(answer)
            sequence += [*(known if known is not None else encode(answer)), specials.eos]
    return _plan(sequence)


def _system_prompt(messages: Sequence[Message]) -> str:
    # Like mistral-common, a system message counts when it has parts, even one empty text part.
    texts = [TURN_SEPARATOR.join(p.text for p in m.parts if isinstance(p, Text) and p.text)
             for m in messages if m.role == "system" and m.parts]
    return TURN_SEPARATOR.join(texts)


def _merge_turns(messages: Sequence[Message]) -> list[_Turn]:
    """Runs of same-role messages as turns; system messages end a run and make no turn."""
    turns: list[_Turn] = []
    first = 0
    for role, run in itertools.groupby(messages, key=lambda message: message.role):
        run_messages = list(run)
        if role != "system":
            turns.append(_Turn(role, _merge_texts(p for m in run_messages for p in m.parts), first))
        first += len(run_messages)
    return turns


def _merge_texts(parts: Iterable[Part]) -> tuple[Part, ...]:
    merged: list[Part] = []
    for part in parts:
        if isinstance(part, Text) and not part.text:
            continue  # mistral-common skips empty text chunks
        if isinstance(part, Text) and merged and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + TURN_SEPARATOR + part.text)
        else:
            merged.append(part)
    return tuple(merged)


def _user_content(parts: tuple[Part, ...], system_prompt: str, encode: Callable[[str], list[int]],
                  specials: SpecialTokens) -> list[int | Image]:
    prefix = system_prompt + TURN_SEPARATOR if system_prompt else ""
    if not any(isinstance(part, Image) for part in parts):
        # mistral-common's text-only content is one string, tokenized together with the system prompt
        return list(encode(prefix + "".join(part.text for part in parts if isinstance(part, Text))))
    if len(parts) == 2 and isinstance(parts[0], Text):
        parts = (parts[1], parts[0])  # InstructTokenizerV3._maybe_put_image_first
    content: list[int | Image] = list(encode(prefix))  # with images, the system prompt is tokenized apart
    for part in parts:
        content += [part, specials.img_end] if isinstance(part, Image) else encode(part.text)
    return content


def _assistant_text(turn: _Turn) -> str:
    if not turn.parts:
        raise ConversationError(f"message {turn.first_message}: an assistant message needs text content")
    (part,) = turn.parts  # Message refuses images outside user messages, so this is one merged Text
    assert isinstance(part, Text)
    return part.text


def _plan(sequence: list[int | Image]) -> PromptPlan:
    """Runs of token ids between image slots."""
    items: list[PromptItem] = []
    images: list[Image] = []
    for is_image, group in itertools.groupby(sequence, key=lambda item: isinstance(item, Image)):
        if is_image:
            for image in group:
                items.append(ImageSlot(len(images)))
                images.append(image)  # type: ignore[arg-type]
        else:
            items.append(tuple(group))  # type: ignore[arg-type]
    return PromptPlan(items=tuple(items), images=tuple(images))
