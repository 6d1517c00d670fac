"""ECMAScript regular expressions (what JSON Schema's `pattern` uses) as GBNF over a JSON string's text."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from pixtral_cpp.backend.gbnf_text import SchemaError, code_escape, gbnf_literal, repeat, short

if TYPE_CHECKING:
    from pixtral_cpp.backend.json_schema import _Converter

# Characters a JSON string cannot hold raw; in a pattern's classes they are written as escapes.
_RAW_FORBIDDEN = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
_SURROGATES = (0xD800, 0xDFFF)
# The escapes written for those a class admits (other control characters: none, which admits fewer).
_ESCAPED = {code: gbnf_literal(json.dumps(chr(code))[1:-1], "") for code in (0x22, 0x5C, 0x0A, 0x0D, 0x09, 0x08, 0x0C)}
_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
          (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
_CLASS_ESCAPES = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False), "W": (_WORD, True),
                  "s": (_SPACE, False), "S": (_SPACE, True)}
_CHAR_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "0": "\0"}
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")
_BRACED_CODE = re.compile(r"\{([0-9a-fA-F]{1,6})\}")


def pattern_gbnf(pattern: str, converter: _Converter, where: str, name: str) -> str:
    """GBNF for the JSON text of the strings that ``pattern`` matches somewhere (JSON Schema patterns are
    unanchored: "[a-z]+" means "holds a lowercase letter"; ^ and $ anchor a branch at the start or end)."""
    parser = _Regex(pattern, where)
    tree = parser.alternation()
    if parser.i < len(pattern):
        raise SchemaError(f"pattern {short(pattern)} at {where} has an unmatched ')'")
    writer = _RegexWriter(converter, where, f"{name}-pattern")
    branches = []
    for sequence in tree[1]:
        items = list(sequence[1])
        anchored_start = bool(items) and items[0] == ("^",)
        anchored_end = len(items) > int(anchored_start) and items[-1] == ("$",)
        items = items[int(anchored_start):len(items) - int(anchored_end)]
        padding = f"{converter.primitive('char')}*"
        parts = [] if anchored_start else [padding]
        parts.append(writer.write(("seq", items)))
        parts += [] if anchored_end else [padding]
        branches.append(" ".join(p for p in parts if p != '""') or '""')
    return " | ".join(branches)


class _Regex:
    """A parser of the ECMAScript regex subset that a grammar can express, into tuples:
    ("alt", [seq]), ("seq", [node]), ("char", code), ("set", ranges, negated), (".",), ("^",), ("$",),
    ("rep", node, min, max or None), ("group", alt)."""

    def __init__(self, pattern: str, where: str) -> None:
        self.p, self.i, self.where = pattern, 0, where

    def fail(self, what: str) -> SchemaError:
        return SchemaError(f"pattern {short(self.p)} at {self.where}: {what} is not supported")

    def alternation(self) -> tuple:
        sequences = [self.sequence()]
        while self.i < len(self.p) and self.p[self.i] == "|":
            self.i += 1
            sequences.append(self.sequence())
        return ("alt", sequences)

    def sequence(self) -> tuple:
        items: list[tuple] = []
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            items.append(self.quantified(self.atom()))
        return ("seq", items)

    def atom(self) -> tuple:
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?<", self.i) and self.p[self.i + 2:self.i + 3] not in ("=", "!"):
                close = self.p.find(">", self.i)
                if close < 0:
                    raise self.fail("an unterminated group name")
                self.i = close + 1
            elif self.p.startswith("?", self.i):
                raise self.fail(f"the group '(?{self.p[self.i + 1:self.i + 2]}' (lookaround or flags)")
            inner = self.alternation()
            if self.i >= len(self.p) or self.p[self.i] != ")":
                raise SchemaError(f"pattern {short(self.p)} at {self.where} has an unclosed '('")
            self.i += 1
            return ("group", inner)
        if c == "[":
            return self.char_class()
        if c in ".^$":
            return (c,)
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?" or (c == "{" and _QUANTIFIER.match(self.p, self.i - 1)):
            raise SchemaError(f"pattern {short(self.p)} at {self.where}: nothing to repeat before {c!r}")
        return ("char", ord(c))

    def quantified(self, atom: tuple) -> tuple:
        if self.i >= len(self.p):
            return atom
        c, counts = self.p[self.i], None
        if c in "*+?":
            self.i += 1
            counts = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (match := _QUANTIFIER.match(self.p, self.i)):
            self.i = match.end()
            low = int(match.group(1))
            high = low if match.group(2) is None else int(match.group(3)) if match.group(3) else None
            if high is not None and high < low:
                raise SchemaError(f"pattern {short(self.p)} at {self.where}: {match.group(0)} is out of order")
            counts = (low, high)
        if counts is None:
            return atom
        if atom[0] in ("^", "$"):
            raise SchemaError(f"pattern {short(self.p)} at {self.where}: an anchor cannot be repeated")
        if self.i < len(self.p) and self.p[self.i] == "?":
            self.i += 1  # lazy: the same strings match
        if self.i < len(self.p) and (self.p[self.i] in "*+?" or _QUANTIFIER.match(self.p, self.i)):
            raise SchemaError(f"pattern {short(self.p)} at {self.where}: nothing to repeat before "
                              f"{self.p[self.i]!r}")
        return ("rep", atom, *counts)

    def escape(self, *, in_class: bool) -> tuple:
        if self.i >= len(self.p):
            raise SchemaError(f"pattern {short(self.p)} at {self.where} ends with a lone backslash")
        c = self.p[self.i]
        self.i += 1
        if c in _CLASS_ESCAPES:
            ranges, negated = _CLASS_ESCAPES[c]
            return ("set", ranges, negated)
        if c in _CHAR_ESCAPES:
            return ("char", ord(_CHAR_ESCAPES[c].encode().decode("unicode_escape")))
        if c == "b" and in_class:
            return ("char", 0x08)
        if c in "bB":
            raise self.fail("a word boundary (\\b, \\B)")
        if c.isdigit():
            raise self.fail("a backreference")
        if c == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", self.p[self.i:self.i + 2]):
            self.i += 2
            return ("char", int(self.p[self.i - 2:self.i], 16))
        if c == "u":
            return ("char", self.unicode_escape())
        if c.isalnum():
            raise self.fail(f"the escape \\{c}")
        return ("char", ord(c))

    def unicode_escape(self) -> int:
        match = _BRACED_CODE.match(self.p, self.i)
        if match and int(match.group(1), 16) < 0x110000:
            self.i = match.end()
            return int(match.group(1), 16)
        if not re.fullmatch(r"[0-9a-fA-F]{4}", self.p[self.i:self.i + 4]):
            raise self.fail("a malformed \\u escape")
        code = int(self.p[self.i:self.i + 4], 16)
        self.i += 4
        low = self.p[self.i + 2:self.i + 6] if self.p.startswith("\\u", self.i) else ""
        if 0xD800 <= code < 0xDC00 and re.fullmatch(r"[dD][c-fC-F][0-9a-fA-F]{2}", low):
            self.i += 6  # a surrogate pair: one character beyond the BMP
            return 0x10000 + ((code - 0xD800) << 10) + (int(low, 16) - 0xDC00)
        if 0xD800 <= code <= 0xDFFF:
            raise self.fail("a lone surrogate escape (not valid text)")
        return code

    def char_class(self) -> tuple:
        negated = self.p.startswith("^", self.i)
        self.i += int(negated)
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= len(self.p):
                raise SchemaError(f"pattern {short(self.p)} at {self.where} has an unclosed '['")
            if self.p[self.i] == "]" and not (first and False):
                self.i += 1
                break
            first = False
            low = self.class_member()
            if isinstance(low, list):
                ranges += low
                continue
            if self.p.startswith("-", self.i) and not self.p.startswith("-]", self.i):
                self.i += 1
                high = self.class_member()
                if isinstance(high, list) or high < low:
                    raise SchemaError(f"pattern {short(self.p)} at {self.where} has a bad class range")
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        return ("set", ranges, negated)

    def class_member(self) -> int | list[tuple[int, int]]:
        c = self.p[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        node = self.escape(in_class=True)
        if node[0] == "set":
            if node[2]:
                raise self.fail("a negated escape (\\D, \\W, \\S) inside a class")
            return list(node[1])
        return node[1]


class _RegexWriter:
    """Writes a parsed pattern as GBNF over the JSON text of the string (escapes where JSON needs them)."""

    def __init__(self, converter: _Converter, where: str, name: str) -> None:
        self.converter, self.where, self.name = converter, where, name

    def write(self, node: tuple) -> str:
        kind = node[0]
        if kind == "alt":
            return " | ".join(self.write(seq) for seq in node[1])
        if kind == "seq":
            out, text = [], ""
            for item in node[1]:
                if item[0] == "char":  # runs of plain characters become one literal
                    text += json.dumps(chr(item[1]), ensure_ascii=False)[1:-1]
                    continue
                if text:
                    out.append(gbnf_literal(text, self.where))
                    text = ""
                out.append(self.write(item))
            out = [piece for piece in out if piece]  # (x{0} is nothing)
            if text:
                out.append(gbnf_literal(text, self.where))
            return " ".join(out) or '""'
        if kind == "char":
            return gbnf_literal(json.dumps(chr(node[1]), ensure_ascii=False)[1:-1], self.where)
        if kind == ".":
            return self.converter.primitive("dot")
        if kind == "group":
            return f"({self.write(node[1])})"
        if kind == "set":
            return self.char_set(node[1], node[2])
        if kind == "rep":
            item = self.converter.atom(self.write(node[1]), f"{self.name}-item")
            return repeat(item, node[2], node[3])
        raise SchemaError(f"pattern at {self.where}: the anchor {kind!r} is supported only at the start or end "
                          "of the pattern (or of a top-level branch)")

    def char_set(self, ranges: list[tuple[int, int]], negated: bool) -> str:
        covered = _merge(ranges)
        if negated:  # written as the positive class of the rest (see _RAW_CHAR)
            covered = _subtract([(0, 0x10FFFF)], covered)
        covered = _subtract(covered, [_SURROGATES])  # no text
        allowed = _subtract(covered, _RAW_FORBIDDEN)
        raw = "[" + "".join(_class_range(lo, hi) for lo, hi in allowed) + "]" if allowed else ""
        escapes = [text for code, text in _ESCAPED.items() if _contains(covered, code)]
        choices = [raw] if raw else []
        choices += escapes
        if not choices:
            raise SchemaError(f"a pattern class at {self.where} matches no character a JSON string can hold")
        return choices[0] if len(choices) == 1 else "(" + " | ".join(choices) + ")"


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        for hole_lo, hole_hi in holes:
            if hole_hi < lo or hole_lo > hi:
                continue
            if hole_lo > lo:
                out.append((lo, hole_lo - 1))
            lo = hole_hi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


def _contains(ranges: list[tuple[int, int]], code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def _class_char(code: int) -> str:
    if chr(code) in "\\]^-[":
        return "\\" + chr(code)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    return chr(code) if code < 0x7F else code_escape(code)  # (raw U+2028 etc. would split the grammar's lines)


def _class_range(lo: int, hi: int) -> str:
    return _class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
