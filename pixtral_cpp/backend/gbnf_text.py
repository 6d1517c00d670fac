"""Writing GBNF text: string literals, bounded repetition, the error a schema's grammar raises.

Shared by the JSON-schema converter (json_schema.py) and its pattern compiler (json_schema_pattern.py).
"""

from __future__ import annotations

from typing import Any

# llama.cpp's MAX_REPETITION_THRESHOLD (src/llama-grammar.cpp): it refuses x{m} over it, reads x{m,n} with n over
# it as x{m,} and refuses an item of k inner rules repeated n times when k * n is over it; `repeat` splits larger
# counts.
MAX_REPETITION = 2000


class SchemaError(ValueError):
    """The schema cannot be turned into a grammar; the message names the keyword and where it is."""


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def gbnf_literal(text: str, where: str) -> str:
    """``text`` as a GBNF string literal."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise SchemaError(f"the text at {where} holds a lone surrogate (U+{code:04X}), which is not valid text")
        elif not ch.isprintable():  # e.g. U+2028 or U+0085: raw, they would split the grammar's lines
            out.append(code_escape(code))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def repeat(item: str, n_min: int, n_max: int | None) -> str:
    """`item` (an atom: see _Converter.atom) n_min to n_max times (None: no limit), in llama.cpp's x{m,n},
    split where a count is over what llama.cpp takes at once."""
    if n_max is None:
        return {0: f"{item}*", 1: f"{item}+"}.get(n_min) or f"{_exactly(item, n_min)} {item}*"
    if n_max <= MAX_REPETITION:
        if n_max == 0:
            return ""
        if (n_min, n_max) == (0, 1):
            return f"{item}?"
        return f"{item}{{{n_min}}}" if n_min == n_max else f"{item}{{{n_min},{n_max}}}"
    if n_min:
        return " ".join(filter(None, [_exactly(item, n_min), repeat(item, 0, n_max - n_min)]))
    # up to MAX_REPETITION - 1, or MAX_REPETITION and then more: two ways alive at once, never more
    more = repeat(item, 0, n_max - MAX_REPETITION)
    return f"({item}{{0,{MAX_REPETITION - 1}}} | {item}{{{MAX_REPETITION}}} {more})"


def _exactly(item: str, n: int) -> str:
    chunks = [MAX_REPETITION] * (n // MAX_REPETITION) + ([n % MAX_REPETITION] if n % MAX_REPETITION else [])
    return " ".join(f"{item}{{{chunk}}}" for chunk in chunks)


def code_escape(code: int) -> str:
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"
