"""JSON schema -> GBNF grammar: pixtral-cpp's own converter (used by sampling.json_schema_grammar).

Why not llama-cpp-python's ``json_schema_to_gbnf`` (an early copy of llama.cpp's converter): it writes
enum/const values with ASCII escapes that GBNF then reads as lone surrogate code points (emoji come out
as replacement characters), does not escape backslashes in literals, lets pattern text write raw `"`
into a JSON string, refuses unanchored patterns, and silently ignores every keyword it does not know
(minimum, maximum, uniqueItems, not, ...): the model is then told to follow a schema that its grammar
does not enforce. Patching around it meant overriding most of its methods; this module is smaller.

The rule throughout: the grammar admits only texts that are valid under the schema (it may admit fewer,
e.g. no properties beyond the declared ones); a keyword that cannot be enforced raises SchemaError
naming it. llama.cpp's C++ converter (common/json-schema-to-grammar.cpp) was read for the ideas only.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pixtral_cpp.backend.gbnf_text import SchemaError, gbnf_literal, repeat, short
from pixtral_cpp.backend.json_schema_pattern import pattern_gbnf

__all__ = ["SchemaError", "schema_to_gbnf"]


# Keywords that say nothing about which texts are valid.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "discriminator", "contentMediaType", "contentEncoding", "$defs", "definitions",
})
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "minProperties", "maxProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems"})
_COMBINATORS = frozenset({"anyOf", "oneOf", "allOf", "$ref"})
_SUPPORTED = (_STRING_KEYWORDS | _NUMBER_KEYWORDS | _OBJECT_KEYWORDS | _ARRAY_KEYWORDS | _COMBINATORS
              | {"type", "enum", "const", "nullable"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# Repeated items are single literals, classes or rule names: llama.cpp counts an item of k inner rules repeated
# n times as k * n against its repetition limit (gbnf_text.MAX_REPETITION).
_ATOM = re.compile(r'[a-zA-Z0-9-]+|"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_MAX_DIGITS = 16
_MAX_UNIQUE_CHOICES = 64  # digits of an integer part (and of a fraction) when the schema sets no bound
_RULE_NAME_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
_MAX_RULE_NAME = 40

# JSON text pieces. `char` is one character of a JSON string as written: raw or an escape. Raw characters are
# a positive class of valid text, since llama.cpp's grammar decodes token bytes leniently (a negated class would
# also admit surrogates and values past U+10FFFF, i.e. invalid UTF-8); JSON forbids raw control characters;
# \u escapes of surrogates are left out too, so every string the grammar admits decodes to valid text.
_RAW_CHAR = r"[ !#-\[\]-~\x80-\uD7FF\uE000-\U0010FFFF]"
_RAW_DOT = r"[ !#-\[\]-~\x80-\u2027\u202A-\uD7FF\uE000-\U0010FFFF]"  # a regex `.`: no line terminators
_PRIMITIVES = {
    "space": '" "?',
    "char": _RAW_CHAR + r' | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}))',
    "string": r'"\"" char* "\"" space',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "integer": f'"-"? ("0" | [1-9] [0-9]{{0,{_MAX_DIGITS - 1}}}) space',
    "number": (f'"-"? ("0" | [1-9] [0-9]{{0,{_MAX_DIGITS - 1}}}) ("." [0-9]{{1,{_MAX_DIGITS}}})? '
               f'([eE] [-+]? [0-9]{{1,3}})? space'),
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space (string ":" space value ("," space string ":" space value)*)? "}" space',
    "array": '"[" space (value ("," space value)*)? "]" space',
    # what a regex `.` matches (no line terminator), as JSON string text
    "dot": _RAW_DOT + r' | "\\" (["\\/bft])',
    # real dates only (February up to the 28th: the 29th needs a leap year), years 1000-9999
    "date": (r'[1-9] [0-9]{3} "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01]) | '
             r'("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8]))'),
    "duration-days": r'[0-9]{1,9} "D"',
    "duration-time": (r'[0-9]{1,9} "H" ([0-9]{1,9} "M")? duration-seconds? | [0-9]{1,9} "M" duration-seconds? | '
                      r'duration-seconds'),
    "duration-seconds": r'[0-9]{1,9} ("." [0-9]{1,6})? "S"',
    "time": (r'([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,9})? '
             r'("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])'),
}
_PRIMITIVE_DEPENDENCIES = {
    "string": ["char", "space"], "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["string", "value", "space"], "array": ["value", "space"], "boolean": ["space"], "null": ["space"],
    "integer": ["space"], "number": ["space"], "duration-time": ["duration-seconds"],
}
_LABEL = "[a-zA-Z0-9-]{1,63}"
_URL_PATH_CHARS = "[a-zA-Z0-9._~!$&'()*+,;=:@/?#-]"
# format -> (the string's content, the shortest and longest it admits, the primitives it uses); "uri" is a
# web address (what pydantic's HttpUrl and AnyUrl hold), its path as long as maxLength leaves room for.
_FORMATS: dict[str, tuple[str, int, int, tuple[str, ...]]] = {
    "date": ("date", 10, 10, ("date",)),
    "time": ("time", 9, 24, ("time",)),
    "date-time": ('date "T" time', 20, 35, ("date", "time")),
    "uuid": (" \"-\" ".join(f"[0-9a-fA-F]{{{n}}}" for n in (8, 4, 4, 4, 12)), 36, 36, ()),
    "email": (f'[a-zA-Z0-9._+-]{{1,64}} "@" {_LABEL} ("." {_LABEL}){{1,4}}', 5, 64 + 1 + 63 + 4 * 64, ()),
    # ISO 8601 durations as pydantic writes timedelta: days, then hours, minutes, seconds; at least one
    "duration": ('"-"? "P" (duration-days ("T" duration-time)? | "T" duration-time)', 3, 61, ("duration-days",
                                                                                                "duration-time")),
}
_URI_HOST = f'("http://" | "https://") {_LABEL} ("." {_LABEL}){{0,3}}'
_URI_HOST_LENGTH = 8 + 63 + 3 * 64
_URI_PATH_LENGTH = 2000  # without maxLength


def schema_to_gbnf(schema: dict[str, Any] | bool) -> str:
    """The GBNF grammar (root rule `root`) of the JSON texts valid under ``schema``."""
    converter = _Converter(schema)
    converter.define("root", converter.visit(schema, "root", "#"))
    return converter.grammar()


class _Converter:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.rules: dict[str, str] = {}
        self.ref_rules: dict[str, str] = {}  # $ref -> its rule's name (set before visiting: recursion)

    # -- rules ------------------------------------------------------------------------------------

    def grammar(self) -> str:
        return "\n".join(f"{name} ::= {body}" for name, body in self.rules.items())

    def define(self, name: str, body: str) -> str:
        """Add rule `name` (made unique) with `body`; its name."""
        base = _RULE_NAME_CHARS.sub("-", name)[:_MAX_RULE_NAME].strip("-") or "rule"
        unique, i = base, 1
        while unique in self.rules or unique in _PRIMITIVES:
            if self.rules.get(unique) == body:
                return unique
            unique, i = f"{base}-{i}", i + 1
        self.rules[unique] = body
        return unique

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dependency in _PRIMITIVE_DEPENDENCIES.get(name, ()):
                self.primitive(dependency)
        return name

    # -- schemas ----------------------------------------------------------------------------------

    def visit(self, schema: Any, name: str, where: str) -> str:
        """A GBNF expression for the JSON values valid under `schema` (each followed by `space`)."""
        if schema is True:
            return self.primitive("value")
        if schema is False:
            raise SchemaError(f"the JSON schema at {where} is false: no value is valid")
        if not isinstance(schema, dict):
            raise SchemaError(f"the JSON schema at {where} must be an object or a boolean, got {short(schema)}")
        for keyword in schema:
            if keyword not in _SUPPORTED and keyword not in _ANNOTATIONS and not keyword.startswith("x-"):
                raise SchemaError(f"the JSON schema keyword {keyword!r} (at {where}) is not supported")
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return f"({self.visit(rest, name, where)} | {self.primitive('null')})"
        if "$ref" in schema:
            self._alone("$ref", schema, where)
            return self.ref(schema["$ref"], where)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self.union(keyword, schema, name, where)
        if "allOf" in schema:
            return self.visit(self.merge_all_of(schema, where), name, where)
        if "const" in schema:
            return self.literal_value(schema["const"], f"{where}/const")
        if "enum" in schema:
            return self.enum(schema, where)
        types = schema.get("type")
        if types is None:
            types = _implied_type(schema)
        if isinstance(types, list):
            if not types or not all(isinstance(t, str) for t in types):
                raise SchemaError(f"'type' at {where} must be a type name or a non-empty list of them")
            return "(" + " | ".join(self.typed(t, schema, name, where) for t in dict.fromkeys(types)) + ")"
        return self.typed(types, schema, name, where)

    def typed(self, kind: Any, schema: dict[str, Any], name: str, where: str) -> str:
        if kind is None:
            return self.primitive("value")
        if kind not in _TYPES:
            raise SchemaError(f"'type' at {where} must be one of {', '.join(_TYPES)}, got {short(kind)}")
        if kind == "object":
            return self.object(schema, name, where)
        if kind == "array":
            return self.array(schema, name, where)
        if kind == "string":
            return self.string(schema, name, where)
        if kind in ("number", "integer"):
            return self.number(kind, schema, name, where)
        return self.primitive(kind)

    def ref(self, ref: Any, where: str) -> str:
        if ref not in self.ref_rules:
            target = self.target(ref, where)
            name = self.define(ref.rsplit("/", 1)[-1] if ref != "#" else "root-ref", f"\0{ref}")  # reserved now
            self.ref_rules[ref] = name
            self.rules[name] = self.visit(target, name, ref)
        return self.ref_rules[ref]

    def union(self, keyword: str, schema: dict[str, Any], name: str, where: str) -> str:
        self._alone(keyword, schema, where)
        branches = schema[keyword]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{keyword} at {where} must be a non-empty list of schemas")
        # oneOf is written like anyOf, so a value matching two branches would be invalid: its branches must be
        # told apart by type or by a const/enum property (pydantic's discriminated unions)
        if keyword == "oneOf":
            resolved = [self.dereferenced(branch, where) for branch in branches]
            for i, first in enumerate(resolved):
                for j in range(i + 1, len(resolved)):
                    if not _disjoint(first, resolved[j]):
                        raise SchemaError(f"oneOf at {where}: branches {i} and {j} may both match a value, which "
                                          "a grammar cannot rule out (use anyOf, or a const property that tells "
                                          "them apart)")
        return "(" + " | ".join(self.visit(branch, f"{name}-{i}", f"{where}/{keyword}/{i}")
                                for i, branch in enumerate(branches)) + ")"

    def merge_all_of(self, schema: dict[str, Any], where: str) -> dict[str, Any]:
        """allOf of one schema (pydantic's way to annotate a $ref), or of object schemas merged."""
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise SchemaError(f"allOf at {where} must be a non-empty list of schemas")
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        if len(parts) == 1 and not set(rest) - _ANNOTATIONS:
            return parts[0]
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for i, part in enumerate([*parts, rest]):
            while isinstance(part, dict) and "$ref" in part:
                part = self.target(part["$ref"], f"{where}/allOf/{i}")
            if not isinstance(part, dict) or set(part) - _ANNOTATIONS - {"type", "properties", "required"} or \
                    part.get("type", "object") != "object":
                raise SchemaError(f"allOf at {where} is supported for one schema or for object schemas with "
                                  "properties and required only")
            for key, sub in part.get("properties", {}).items():
                if merged["properties"].setdefault(key, sub) != sub:  # both would apply: not expressible here
                    raise SchemaError(f"allOf at {where} describes property {key!r} twice, differently")
            merged["required"] += part.get("required", [])
        return merged

    def dereferenced(self, schema: Any, where: str) -> Any:
        for _ in range(32):  # a chain of plain references
            if not (isinstance(schema, dict) and "$ref" in schema):
                return schema
            schema = self.target(schema["$ref"], where)
        raise SchemaError(f"$ref at {where} refers to references past 32 in a row")

    def target(self, ref: Any, where: str) -> Any:
        """The part of the schema that `ref` (a JSON pointer: #/$defs/Name) points to."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"$ref {short(ref)} at {where} is not supported: only references inside the "
                              "schema ('#/$defs/Name') are")
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                raise SchemaError(f"$ref {ref!r} at {where} points to nothing in the schema")
        return target

    @staticmethod
    def _alone(keyword: str, schema: dict[str, Any], where: str) -> None:
        others = sorted(set(schema) - _ANNOTATIONS - {keyword})
        if others:
            raise SchemaError(f"{keyword} at {where} together with {', '.join(map(repr, others))} is not supported: "
                              f"move them into the {keyword}")

    # -- constants --------------------------------------------------------------------------------

    def literal_value(self, value: Any, where: str) -> str:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"the value at {where} is not JSON data: {exc}") from exc
        return f"{gbnf_literal(text, where)} {self.primitive('space')}"

    def enum(self, schema: dict[str, Any], where: str) -> str:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"enum at {where} must be a non-empty list")
        types = schema.get("type")
        if types is not None:  # {"enum": [...], "type": "string"}: only the values of that type are valid
            allowed = set(types) if isinstance(types, list) else {types}
            values = [v for v in values if allowed & _json_types(v)]
            if not values:
                raise SchemaError(f"no enum value at {where} is of the type {types!r}")
        return "(" + " | ".join(self.literal_value(v, f"{where}/enum/{i}") for i, v in enumerate(values)) + ")"

    # -- objects and arrays -----------------------------------------------------------------------

    def object(self, schema: dict[str, Any], name: str, where: str) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise SchemaError(f"at {where}, properties must be an object and required a list")
        extra = schema.get("additionalProperties", True)
        if not isinstance(extra, (bool, dict)):
            raise SchemaError(f"additionalProperties at {where} must be a boolean or a schema, got {short(extra)}")
        if not properties:
            return self.map_object(schema, extra, name, where)
        missing = [key for key in required if key not in properties]
        if missing:
            raise SchemaError(f"required {missing[0]!r} at {where} is not among the properties: not supported")
        n_min, n_max = _count(schema, "minProperties", where), _count(schema, "maxProperties", where, None)
        if n_min > len(set(required)) or (n_max is not None and n_max < len(properties)):
            raise SchemaError(f"minProperties/maxProperties at {where} can only be enforced on an object "
                              "without properties (a map), or when the properties already satisfy them")
        space = self.primitive("space")
        pieces = []  # (kv rule, required?) in declared order; properties beyond them are left out (allowed)
        for key, sub in properties.items():
            value = self.visit(sub, f"{name}-{key}", f"{where}/properties/{key}")
            kv = self.define(f"{name}-{key}-kv", f'{gbnf_literal(json.dumps(key, ensure_ascii=False), where)} '
                                                 f'{space} ":" {space} {value}')
            pieces.append((kv, key in required))
        return f'"{{" {space} {self.property_list(pieces, name)} "}}" {space}'

    def property_list(self, pieces: list[tuple[str, bool]], name: str) -> str:
        """The properties in order, each optional one present or not, commas between those present."""
        def piece(kv: str, needed: bool) -> str:  # a property after one already written
            return f'"," space {kv}' if needed else f'("," space {kv})?'
        first_required = next((i for i, (_, needed) in enumerate(pieces) if needed), len(pieces))
        if first_required == 0:
            return " ".join([pieces[0][0], *(piece(kv, needed) for kv, needed in pieces[1:])])
        # Leading optional properties: the first one written is any of them, or the first required one. What
        # may follow property i is rule tails[i + 1], defined from the end so that each is written once.
        last = min(first_required, len(pieces) - 1)
        tails = {last + 1: " ".join(piece(kv, needed) for kv, needed in pieces[last + 1:])}
        if tails[last + 1]:
            tails[last + 1] = self.define(f"{name}-after-{last}", tails[last + 1])
        for i in range(last, 0, -1):
            tails[i] = self.define(f"{name}-after-{i - 1}", f"{piece(*pieces[i])} {tails[i + 1]}".strip())
        body = " | ".join(f"{pieces[i][0]} {tails[i + 1]}".strip() for i in range(last + 1))
        return f"({body})" if first_required < len(pieces) else f"({body})?"

    def map_object(self, schema: dict[str, Any], extra: Any, name: str, where: str) -> str:
        """An object of any keys (the required ones first), each value valid under additionalProperties."""
        space = self.primitive("space")
        required = list(dict.fromkeys(schema.get("required", [])))
        if extra is False:
            if required:
                raise SchemaError(f"required {required[0]!r} at {where} is not among the properties, and no "
                                  "other property is allowed")
            return f'"{{" {space} "}}" {space}'
        value = self.visit(extra if isinstance(extra, dict) else True, f"{name}-value",
                           f"{where}/additionalProperties")
        kv = self.define(f"{name}-kv", f'{self.primitive("string")} ":" {space} {value}')
        sep = f'"," {space}'
        fixed = [f'{gbnf_literal(json.dumps(k, ensure_ascii=False), where)} {space} ":" {space} {value}'
                 for k in required]
        n_min = _count(schema, "minProperties", where)
        n_max = _count(schema, "maxProperties", where, None)
        if n_max is not None and n_max < max(n_min, len(fixed)):
            raise SchemaError(f"maxProperties at {where} is below minProperties or the required properties")
        return f'"{{" {space} {self.list_of(fixed, kv, sep, n_min, n_max, name)} "}}" {space}'

    def list_of(self, fixed: list[str], item: str, sep: str, n_min: int, n_max: int | None, name: str) -> str:
        """The `fixed` elements, then `item`s: n_min..n_max elements in all, `sep` between them."""
        rest_min = max(n_min - len(fixed), 0)
        rest_max = None if n_max is None else n_max - len(fixed)
        if rest_max == 0:
            return f" {sep} ".join(fixed)
        if not fixed:  # written twice below (the first, then the others after a separator): name it
            item = self.atom(item, f"{name}-item")
        before = 0 if fixed else 1  # the elements written before the separated ones
        more = repeat(self.atom(f"{sep} {item}", f"{name}-more"), max(rest_min - before, 0),
                      None if rest_max is None else rest_max - before)
        if fixed:
            return " ".join(filter(None, [f" {sep} ".join(fixed), more]))
        if rest_min:
            return f"{item} {more}".strip()
        return f"{self.atom(f'{item} {more}'.strip(), f'{name}-items')}?"  # a group would count its inner rules

    def atom(self, expression: str, name: str) -> str:
        """`expression` as one GBNF item that llama.cpp can repeat (a literal, class or rule name)."""
        return expression if _ATOM.fullmatch(expression) else self.define(name, expression)

    def array(self, schema: dict[str, Any], name: str, where: str) -> str:
        if schema.get("uniqueItems") is True:
            return self.unique_choices(schema, name, where)
        prefix, items = schema.get("prefixItems", []), schema.get("items")
        if isinstance(items, list):  # drafts 4 to 2019-09 write tuples this way
            prefix, items = items, schema.get("additionalItems")
        if not isinstance(prefix, list):
            raise SchemaError(f"prefixItems at {where} must be a list of schemas")
        n_min, n_max = _count(schema, "minItems", where), _count(schema, "maxItems", where, None)
        if n_max is not None and n_max < n_min:
            raise SchemaError(f"maxItems {n_max} at {where} is below minItems {n_min}: no array is valid")
        space = self.primitive("space")
        # An array may be shorter than its prefixItems; writing all of them (up to maxItems) is valid.
        fixed = [self.visit(sub, f"{name}-{i}", f"{where}/prefixItems/{i}") for i, sub in enumerate(prefix)]
        fixed = fixed[:n_max] if n_max is not None else fixed
        if items is None and prefix:  # items beyond the prefix may be anything: write only those needed
            items, n_max = True, max(n_min, len(fixed))
        if items is False:
            if n_min > len(fixed):
                raise SchemaError(f"minItems {n_min} at {where} asks for more items than prefixItems allows")
            n_max = len(fixed)
        item = "" if n_max == len(fixed) else self.visit(True if items is None else items, f"{name}-item",
                                                         f"{where}/items")
        elements = self.list_of(fixed, item, f'"," {space}', n_min, n_max, name)
        return f'"[" {space} {elements} "]" {space}'

    def unique_choices(self, schema: dict[str, Any], name: str, where: str) -> str:
        """uniqueItems over a few enum values (pydantic's set[Enum] or set[Literal]): each value at most once,
        in the enum's order (a valid subset of the orders). Other unique arrays cannot be enforced."""
        items = schema.get("items")
        while isinstance(items, dict) and set(items) - _ANNOTATIONS == {"$ref"}:
            items = self.target(items["$ref"], f"{where}/items")
        values = None
        if isinstance(items, dict) and not set(items) - _ANNOTATIONS - {"enum", "const", "type"}:
            values = [items["const"]] if "const" in items else items.get("enum")
        n_min, n_max = _count(schema, "minItems", where), _count(schema, "maxItems", where, None)
        if not isinstance(values, list) or len(values) > _MAX_UNIQUE_CHOICES or "prefixItems" in schema:
            raise SchemaError(f"uniqueItems (at {where}) can only be enforced on an array of at most "
                              f"{_MAX_UNIQUE_CHOICES} enum values")
        values = list({json.dumps(v, sort_keys=True): v for v in values}.values())
        if n_min > 1 or (n_max is not None and n_max < len(values)):
            raise SchemaError(f"minItems/maxItems at {where} together with uniqueItems cannot be enforced (beyond "
                              "minItems 1)")
        literals = [self.visit({"const": v}, name, where) for v in values]
        pieces = [(self.define(f"{name}-{i}", literal), False) for i, literal in enumerate(literals)]
        body = self.property_list(pieces, name)  # like optional properties: any subset, commas between
        if n_min == 1:
            body = body.removesuffix("?")
        space = self.primitive("space")
        return f'"[" {space} {body} "]" {space}'

    # -- strings ----------------------------------------------------------------------------------

    def string(self, schema: dict[str, Any], name: str, where: str) -> str:
        n_min, n_max = _count(schema, "minLength", where), _count(schema, "maxLength", where, None)
        if n_max is not None and n_max < n_min:
            raise SchemaError(f"maxLength {n_max} at {where} is below minLength {n_min}: no string is valid")
        space = self.primitive("space")
        fmt, pattern = schema.get("format"), schema.get("pattern")
        if pattern is not None:
            for keyword in ("minLength", "maxLength"):
                if keyword in schema:
                    raise SchemaError(f"{keyword} at {where} together with pattern cannot be enforced: put the length "
                                      "into the pattern")
        if fmt is not None and pattern is not None:
            raise SchemaError(f"format together with pattern at {where} is not supported")
        if fmt is not None:
            return f'"\\"" {self.formatted(fmt, n_min, n_max, where)} "\\"" {space}'
        if pattern is not None:
            if not isinstance(pattern, str):
                raise SchemaError(f"pattern at {where} must be a string")
            return f'"\\"" {self.define(f"{name}-pattern", pattern_gbnf(pattern, self, where, name))} "\\"" {space}'
        if n_min == 0 and n_max is None:
            return self.primitive("string")
        return f'"\\"" {repeat(self.primitive("char"), n_min, n_max)} "\\"" {space}'

    def formatted(self, fmt: Any, n_min: int, n_max: int | None, where: str) -> str:
        """A string of format `fmt` within the length bounds (those the format's own lengths satisfy)."""
        if fmt == "uri":
            room = _URI_PATH_LENGTH if n_max is None else n_max - _URI_HOST_LENGTH - 1
            if room < 0:
                raise SchemaError(f"maxLength {n_max} at {where} is too short for the web addresses this format is "
                                  f"written as: at least {_URI_HOST_LENGTH + 1}")
            path = self.define(f"url-path-{room}", f'"/" {repeat(_URL_PATH_CHARS, 0, room)}')  # a rule: see repeat
            content, shortest, longest, uses = f"{_URI_HOST} {path}?", 8, n_max, ()
        elif fmt in _FORMATS:
            content, shortest, longest, uses = _FORMATS[fmt]
        else:
            raise SchemaError(f"the string format {short(fmt)} (at {where}) is not supported; supported: "
                              f"{', '.join([*_FORMATS, 'uri'])} (or describe the text with a pattern)")
        if n_min > shortest or (n_max is not None and longest is not None and n_max < longest):
            raise SchemaError(f"minLength/maxLength at {where} cut into format {fmt!r} ({shortest} to {longest} "
                              "characters): not supported")
        for primitive in uses:
            self.primitive(primitive)
        return content

    # -- numbers ----------------------------------------------------------------------------------

    def number(self, kind: str, schema: dict[str, Any], name: str, where: str) -> str:
        if "multipleOf" in schema:
            raise SchemaError(f"multipleOf (at {where}) cannot be enforced")
        low, low_open = _bound(schema, "minimum", "exclusiveMinimum", max, where)
        high, high_open = _bound(schema, "maximum", "exclusiveMaximum", min, where)
        if low is None and high is None:
            return self.primitive(kind)
        space = self.primitive("space")
        if kind == "integer":
            lo = None if low is None else math.floor(low) + 1 if low_open else math.ceil(low)
            hi = None if high is None else math.ceil(high) - 1 if high_open else math.floor(high)
            if lo is not None and hi is not None and lo > hi:
                raise SchemaError(f"no integer satisfies the bounds at {where}")
            return f"{self.define(f'{name}-range', integer_range(lo, hi))} {space}"
        for value, keyword in ((low, "exclusiveMinimum" if low_open else "minimum"),
                               (high, "exclusiveMaximum" if high_open else "maximum")):
            if value is not None and value != math.floor(value):
                raise SchemaError(f"{keyword} {value} at {where}: on a number only whole bounds can be enforced "
                                  "(use a whole bound, or an integer type)")
        expression = number_range(None if low is None else int(low), low_open,
                                  None if high is None else int(high), high_open)
        if not expression:
            raise SchemaError(f"no number satisfies the bounds at {where}")
        return f"{self.define(f'{name}-range', expression)} {space}"


# -- helpers ------------------------------------------------------------------------------------------


def _json_types(value: Any) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number", "integer"} if value.is_integer() else {"number"}
    if isinstance(value, str):
        return {"string"}
    return {"array"} if isinstance(value, list) else {"object"}


def _kinds(schema: Any) -> set[str] | None:
    """The JSON types `schema` admits, when it says (None: any)."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return _json_types(schema["const"])
    if isinstance(schema.get("enum"), list):
        return set().union(*map(_json_types, schema["enum"]))
    kinds = schema.get("type")
    if isinstance(kinds, str):
        kinds = [kinds]
    if not isinstance(kinds, list):
        return None
    kinds = set(kinds) | ({"number"} if "integer" in kinds else set()) | ({"integer"} if "number" in kinds else set())
    return kinds | ({"null"} if schema.get("nullable") is True else set())


def _literals(schema: Any) -> list[str] | None:
    """The values `schema` admits (as JSON), when it lists them."""
    if isinstance(schema, dict) and "const" in schema:
        return [json.dumps(schema["const"], sort_keys=True)]
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list):
        return [json.dumps(value, sort_keys=True) for value in schema["enum"]]
    return None


def _disjoint(a: Any, b: Any) -> bool:
    """True when no value can match both schemas: other types, or a required property with other values."""
    kinds_a, kinds_b = _kinds(a), _kinds(b)
    if kinds_a is not None and kinds_b is not None and not kinds_a & kinds_b:
        return True
    if _literals(a) is not None and _literals(b) is not None:
        return not set(_literals(a)) & set(_literals(b))
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    both = set(a.get("required", [])) & set(b.get("required", []))
    props_a, props_b = a.get("properties", {}), b.get("properties", {})
    for key in both:
        values_a, values_b = _literals(props_a.get(key)), _literals(props_b.get(key))
        if values_a is not None and values_b is not None and not set(values_a) & set(values_b):
            return True
    return False


def _implied_type(schema: dict[str, Any]) -> str | None:
    """A schema without `type` whose keywords belong to one kind: that kind (a valid subset)."""
    for kind, keywords in (("object", _OBJECT_KEYWORDS), ("array", _ARRAY_KEYWORDS), ("string", _STRING_KEYWORDS),
                           ("number", _NUMBER_KEYWORDS)):
        if keywords & set(schema):
            return kind
    return None


def _count(schema: dict[str, Any], keyword: str, where: str, default: int | None = 0) -> Any:
    value = schema.get(keyword, default)
    if value is default:
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SchemaError(f"{keyword} at {where} must be an integer >= 0, got {short(value)}")
    return value


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str, tighter: Any, where: str
           ) -> tuple[float | None, bool]:
    """The tighter of the inclusive and exclusive bound: (value, is it exclusive?)."""
    found: list[tuple[float, bool]] = []
    for keyword, is_open in ((inclusive, False), (exclusive, True)):
        value = schema.get(keyword)
        if value is None:
            continue
        if isinstance(value, bool) and keyword == exclusive:  # draft 4: a flag on the inclusive bound
            if value and schema.get(inclusive) is not None:
                found = [(schema[inclusive], True)]
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaError(f"{keyword} at {where} must be a number, got {short(value)}")
        found.append((value, is_open))
    if not found:
        return None, False
    best = tighter(value for value, _ in found)
    return best, any(is_open for value, is_open in found if value == best)


# -- numeric ranges --------------------------------------------------------------------------------------


def integer_range(lo: int | None, hi: int | None) -> str:
    """The integers in [lo, hi] (None: unbounded) as JSON text (no "-0", no leading zeros)."""
    alternatives = []
    if hi is None or hi >= 0:
        alternatives.append(_whole(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        magnitudes = _whole(1 if hi is None or hi >= 0 else -hi, None if lo is None else -lo)
        alternatives.append(f'"-" ({magnitudes})')
    return " | ".join(alternatives)


def number_range(lo: int | None, lo_open: bool, hi: int | None, hi_open: bool) -> str:
    """The numbers in the range with whole bounds (exponents left out), as JSON text; "" when none."""
    alternatives = []
    if hi is None or hi > 0 or (hi == 0 and not hi_open):
        start, start_open = (lo, lo_open) if lo is not None and lo >= 0 else (0, False)
        alternatives.append(_magnitude(start, start_open, hi, hi_open))
    if lo is None or lo < 0:
        start, start_open = (-hi, hi_open) if hi is not None and hi < 0 else (0, True)
        negative = _magnitude(start, start_open, None if lo is None else -lo, lo_open)
        alternatives.append(f'"-" ({negative})' if negative else "")
    return " | ".join(a for a in alternatives if a)


_FRACTION = f'("." [0-9]{{1,{_MAX_DIGITS}}})?'
_ZERO_FRACTION = f'("." "0"{{1,{_MAX_DIGITS}}})?'
_NONZERO_FRACTION = f'"." "0"{{0,{_MAX_DIGITS - 1}}} [1-9] [0-9]{{0,{_MAX_DIGITS - 1}}}'


def _magnitude(a: int, a_open: bool, b: int | None, b_open: bool) -> str:
    """Numbers x >= 0 with a <(=) x <(=) b, written without a sign."""
    alternatives = []
    # whole part in [a, b - 1] (past a when a is excluded): any fraction keeps x below b
    first, last = a + 1 if a_open else a, None if b is None else b - 1
    if last is None or first <= last:
        alternatives.append(f"({_whole(first, last)}) {_FRACTION}")
    if a_open and (b is None or a < b):  # a itself with a fraction above zero
        alternatives.append(f'"{a}" {_NONZERO_FRACTION}')
    if b is not None and not b_open and (b > a or (b == a and not a_open)):  # b itself
        alternatives.append(f'"{b}" {_ZERO_FRACTION}')
    return " | ".join(alternatives)


def _whole(a: int, b: int | None) -> str:
    """Whole numbers a..b in decimal (a >= 0; b None: up to _MAX_DIGITS digits, or as many as a has)."""
    low_digits = len(str(a))
    top_digits = len(str(b)) if b is not None else max(_MAX_DIGITS, low_digits)
    if b is not None and low_digits == top_digits:
        return _same_length(str(a), str(b))
    alternatives = [_same_length(str(a), "9" * low_digits)]
    full_lengths = top_digits - low_digits - (1 if b is not None else 0)  # lengths where every number counts
    if full_lengths > 0:
        alternatives.append(f"[1-9] [0-9]{{{low_digits},{low_digits + full_lengths - 1}}}")
    if b is not None:
        alternatives.append(_same_length("1" + "0" * (top_digits - 1), str(b)))
    return " | ".join(alternatives)


def _same_length(lo: str, hi: str) -> str:
    """Decimal strings of equal length between lo and hi."""
    if lo == hi:
        return f'"{lo}"'
    rest = len(lo) - 1
    if lo[0] == hi[0]:
        return f'"{lo[0]}" ({_same_length(lo[1:], hi[1:])})'
    low_full, high_full = lo[1:] == "0" * rest, hi[1:] == "9" * rest
    start = int(lo[0]) if low_full else int(lo[0]) + 1
    end = int(hi[0]) if high_full else int(hi[0]) - 1
    tail = f" [0-9]{{{rest}}}" if rest else ""
    alternatives = []
    if not low_full:
        alternatives.append(f'"{lo[0]}" ({_same_length(lo[1:], "9" * rest)})')
    if start <= end:
        alternatives.append(f"[{start}-{end}]{tail}" if start < end else f'"{start}"{tail}')
    if not high_full:
        alternatives.append(f'"{hi[0]}" ({_same_length("0" * rest, hi[1:])})')
    return " | ".join(alternatives)
