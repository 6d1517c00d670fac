"""Refusing text that is not valid Unicode before it reaches the tokenizer or a grammar.

A Python str can hold lone surrogates that no UTF-8 byte sequence spells: Python decodes undecodable
argv, file names and stdin bytes with surrogateescape (byte 0xff becomes U+DCFF), and JSON allows an
unpaired "\\ud800" escape. llama.cpp needs UTF-8, so such text would crash deep inside the tokenizer.
It is refused, not replaced: replacing would silently change what the user wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pixtral_cpp.errors import ConversationError

# surrogateescape maps an undecodable byte 0x80..0xff to U+DC80..U+DCFF
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def check_text(text: str, where: str) -> None:
    """Raise ConversationError naming `where` (e.g. "the prompt") if `text` is not valid Unicode text."""
    if not isinstance(text, str):
        raise ConversationError(f"{where} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConversationError(f"{where} {_reason(text, error.start)}") from None


def check_json_text(value: Any, where: str) -> None:
    """check_text for every string of a JSON-like value, keys included, e.g. a JSON schema's enum values.

    Iterative, so a deeply nested value costs no recursion; the location is spelled only on failure.
    """
    stack: list[tuple[Any, tuple | None]] = [(value, None)]  # (item, (key, parent path) or None)
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_text(item, _spell(where, path))
        elif isinstance(item, Mapping):
            for key, child in item.items():
                if isinstance(key, str):
                    check_text(key, f"a key of {_spell(where, path)}")
                stack.append((child, (key, path)))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, (index, path)) for index, child in enumerate(item))


def _spell(where: str, path: tuple | None) -> str:
    keys: list[object] = []
    while path is not None:
        key, path = path
        keys.append(key)
    # repr() writes a surrogate in a key as \udcXX, so the message itself is always valid text
    return where + "".join(f"[{key!r}]" for key in reversed(keys))


def _reason(text: str, position: int) -> str:
    code = ord(text[position])
    if code in _ESCAPED_BYTES:
        return (f"is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at position {position}); "
                "check your terminal's or file's encoding")
    return (f"holds a lone surrogate U+{code:04X} at position {position}, which is not valid Unicode; "
            "a character outside the BMP must be sent whole (a JSON \\ud83d escape needs its pair)")
