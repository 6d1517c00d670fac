"""The six ways to ask PixtralModel, built from one stream so that each parameter list is written once.

`stream_chat` answers a conversation. `collected` turns a stream method into the call that returns
the whole Completion (`chat`), `in_thread` into the asyncio stream run in a worker thread
(`astream_chat`), and `describing` turns each chat form into its describe form, whose images, prompt
and system prompt become the messages at the call (so a bad prompt is refused at once, even by
`astream_describe`). The forms keep their names, docstrings and signatures for help() and IDEs.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing
from typing import Any, ParamSpec, TypeVar

from pixtral_cpp.aio import stream_in_thread
from pixtral_cpp.control import CancelToken, ProgressCallback
from pixtral_cpp.conversation import Image, Message, Text
from pixtral_cpp.defaults import DEFAULT_PROMPT
from pixtral_cpp.errors import ConversationError
from pixtral_cpp.images import ImageSource
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import Chunk, Completion, TextChunk
from pixtral_cpp.valid_text import check_text

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


def collected(stream: Callable[P, Iterator[Chunk]], doc: str) -> Callable[P, Completion]:
    """The form of a `stream_*` method that returns its text joined, with the statistics."""

    def collect(*args: P.args, **kwargs: P.kwargs) -> Completion:
        parts: list[str] = []
        with closing(stream(*args, **kwargs)) as chunks:  # type: ignore[type-var]
            for chunk in chunks:
                if not isinstance(chunk, TextChunk):
                    return Completion("".join(parts), chunk)
                parts.append(chunk.text)
        raise AssertionError("a stream always ends with its statistics")

    return _form_of(collect, stream.__name__.removeprefix("stream_"), doc, beside=stream, returns="Completion")


def in_thread(stream: Callable[P, Iterator[Chunk]], doc: str) -> Callable[P, AsyncIterator[Chunk]]:
    """The asyncio form of a `stream_*` method: the stream runs in a worker thread (pixtral_cpp.aio)."""

    def run(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Chunk]:
        cancel = kwargs.pop("cancel", None)  # keyword-only in every form
        return stream_in_thread(lambda token: stream(*args, **kwargs, cancel=token), cancel)  # type: ignore[arg-type]

    return _form_of(run, "a" + stream.__name__, doc, beside=stream, returns="AsyncIterator[Chunk]")


def describing(chat_form: Callable[..., R], doc: str):  # returns `describe` below: type checkers infer it
    """The describe form of a chat form: one question about images, which come first, then the prompt."""

    def describe(self, images: ImageSource | Sequence[ImageSource], prompt: str = DEFAULT_PROMPT,
                 options: GenerationOptions | None = None, *, system: str | None = None,
                 cancel: CancelToken | None = None, on_progress: ProgressCallback | None = None,
                 **option_fields: Any) -> R:
        return chat_form(self, _describe_messages(images, prompt, system), options, cancel=cancel,
                         on_progress=on_progress, **option_fields)

    return _form_of(describe, chat_form.__name__.replace("chat", "describe"), doc, beside=chat_form,
                    parameters=describe, returns=inspect.signature(chat_form).return_annotation)


def _form_of(form: F, name: str, doc: str, *, beside: Callable[..., Any], returns: str,
             parameters: Callable[..., Any] | None = None) -> F:
    """`form` as the method `name` of `beside`'s class, with `doc`, and for help() the signature of
    `parameters` (default: `beside`) returning `returns`."""
    form.__name__ = name
    form.__qualname__ = f"{beside.__qualname__.rpartition('.')[0]}.{name}"
    form.__module__ = beside.__module__
    form.__doc__ = doc
    signature = inspect.signature(parameters or beside).replace(return_annotation=returns)
    form.__signature__ = signature  # type: ignore[attr-defined]
    return form


def _describe_messages(images: ImageSource | Sequence[ImageSource], prompt: str, system: str | None
                       ) -> list[Message]:
    check_text(prompt, "the prompt")  # named here; Message would only say "part N"
    if system is not None:
        check_text(system, "the system prompt")
    # One image unless a list of them: str, bytes and memoryview are Sequences too
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
        images = [images]
    elif not images:
        raise ConversationError("describe() needs at least one image, got none; use chat() for a question "
                                "without images")
    messages = [Message("system", (Text(system),))] if system else []
    messages.append(Message("user", (*(Image(source) for source in images), Text(prompt))))
    return messages
