"""JSON schemas as grammars (pixtral_cpp.backend.json_schema) with real llama.cpp on the tiny random Pixtral:
what the grammar admits is checked by generating (many seeds, every token possible) and by feeding texts
through llama.cpp's grammar sampler; every generated answer is validated with `jsonschema`."""

from __future__ import annotations

import ctypes
import datetime
import enum
import json
import math
import re
import time
import uuid
from typing import Annotated, Literal

import jsonschema
import numpy as np
import pydantic
import pytest

from pixtral_cpp.backend import (
    GrammarError,
    Sampler,
    SamplingOptions,
    TextModel,
    TextModelOptions,
    bindings,
    json_schema_grammar,
)
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.server.config import ServerConfig
from pixtral_cpp.server.protocol import RequestError, parse_chat_request, request_error_from

RANDOM = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # every token possible
PROMPT = "Answer in JSON."


@pytest.fixture(scope="module")
def model(converted):
    text_path, _ = converted("F32")
    with TextModel(text_path, TextModelOptions(n_ctx=1024, flash_attn="off")) as text_model:
        yield text_model


def generate(model: TextModel, grammar: str, seed: int, n: int = 120) -> str:
    """The answer a random model writes under `grammar`; it must end within `n` tokens."""
    options = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
    with Sampler(model, options, grammar=grammar) as sampler:
        model.clear()
        model.eval_tokens(model.tokenize(PROMPT))
        pieces = b""
        for _ in range(n):
            token = sampler.sample()
            if model.is_end_of_generation(token):
                return pieces.decode("utf-8")  # strict: the grammar must only admit valid UTF-8
            pieces += model.token_piece(token)
            model.eval_tokens([token])
    raise AssertionError(f"the answer did not end within {n} tokens: {pieces[:200]!r}")


def accepts(model: TextModel, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets `text` be written, token by token, and then end."""
    llama, _ = bindings()
    vocab = llama.llama_model_get_vocab(model._handles()[0])
    stage = llama.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    assert stage, "llama.cpp rejected the grammar"
    try:
        tokens = model.tokenize(text, add_special=False) + [2]  # then </s>: the grammar must be complete
        for token in tokens:
            data = (llama.llama_token_data * 1)(llama.llama_token_data(id=token, logit=0.0, p=0.0))
            array = llama.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
            llama.llama_sampler_apply(stage, ctypes.byref(array))
            if data[0].logit == -math.inf:
                return False
            if token != 2:
                llama.llama_sampler_accept(stage, token)
        return True
    finally:
        llama.llama_sampler_free(stage)


def sample_valid(model: TextModel, schema: dict, seeds: range, n: int = 120) -> list:
    grammar = json_schema_grammar(schema)
    values = []
    for seed in seeds:
        value = json.loads(generate(model, grammar, seed, n))
        jsonschema.validate(value, schema)
        values.append(value)
    return values


# -- characters beyond the Basic Multilingual Plane ----------------------------------------------------

EMOJI = ["😀 smile", "🎉", "naïve ✓", 'say "hi" \\ 𝄞']


def test_emoji_enum_values_come_back_intact(model):
    schema = {"type": "object", "properties": {"mood": {"enum": EMOJI}, "tag": {"const": "🚀x"}},
              "required": ["mood", "tag"]}
    values = sample_valid(model, schema, range(8))
    assert all(v["tag"] == "🚀x" and v["mood"] in EMOJI for v in values)
    assert len({v["mood"] for v in values}) > 1  # the seeds do explore the choices
    grammar = json_schema_grammar({"enum": EMOJI})
    assert accepts(model, grammar, json.dumps("🎉", ensure_ascii=False))
    assert not accepts(model, grammar, '"\ufffd"') and not accepts(model, grammar, '"\\ud83c\\udf89"')


def test_free_strings_admit_no_surrogate_escapes(model):
    grammar = json_schema_grammar({"type": "string", "maxLength": 4})
    assert accepts(model, grammar, '"a\\u00e9"') and accepts(model, grammar, '"𝄞"')
    assert not accepts(model, grammar, '"\\ud834\\udd1e"') and not accepts(model, grammar, '"\\udd1e"')
    assert not accepts(model, grammar, '"a\nb"')  # a raw control character is not JSON


# -- patterns ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "texts"), [
    ("[a-z]+", ["abc", "ABCd", "12x34", "x\ny", "-", "", "ABC", "12"]),
    ("^[0-9]{3}", ["123", "1234", "123abc", "12", "a123"]),
    ("[0-9]{2}$", ["12", "ab12", "12a", "1"]),
    ("^(cat|dog)s?$", ["cat", "dogs", "cats!", "bird", ""]),
    ("^\\d{2}-\\w+\\.$", ["12-ab_c.", "12-.", "1-ab."]),
    ('^a"b\\\\c$', ['a"b\\c', "ab\\c"]),
    ("^[^a-z]{2}$", ["AB", '"\\', "aB", "A\n"]),
    ("^x.y$", ["xzy", 'x"y', "x\ny", "xy"]),
    ("^\\u00e9\\ud83c\\udf89$", ["é🎉", "e🎉"]),
])
def test_patterns_are_unanchored_unless_anchored(model, pattern, texts):
    grammar = json_schema_grammar({"type": "string", "pattern": pattern})
    for text in texts:
        expected = re.search(pattern.replace("\\u00e9", "é").replace("\\ud83c\\udf89", "🎉"), text) is not None
        assert accepts(model, grammar, json.dumps(text, ensure_ascii=False)) == expected, (pattern, text)


def test_generated_pattern_strings_match(model):
    schema = {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,3}$"},
        "word": {"type": "string", "pattern": "^(yes|no|maybe)$"}}, "required": ["code", "word"]}
    sample_valid(model, schema, range(6))


@pytest.mark.parametrize(("pattern", "feature"), [
    ("(?=a)b", "lookaround"), ("(a)\\1", "backreference"), ("\\bword", "word boundary"), ("a(^b)", "anchor"),
    ("\\p{L}", "escape \\p"), ("*a", "nothing to repeat"), ("(ab", "unclosed"), ("ab)", "unmatched"),
])
def test_unsupported_pattern_features_are_named(pattern, feature):
    with pytest.raises(GrammarError, match=re.escape(feature)):
        json_schema_grammar({"type": "string", "pattern": pattern})


# -- numbers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [
    {"minimum": 0, "maximum": 5}, {"minimum": -12, "maximum": 7}, {"exclusiveMinimum": 97, "exclusiveMaximum": 1003},
    {"maximum": -20}, {"minimum": 123}, {"minimum": 1.5, "maximum": 3.5}, {"minimum": -5, "exclusiveMaximum": 0},
])
def test_integer_ranges_are_exact(model, bounds):
    schema = {"type": "integer", **bounds}
    grammar = json_schema_grammar(schema)
    for value in range(-1100, 1100):
        assert accepts(model, grammar, str(value)) == _valid(value, schema), value
    for text in ("-0", "007", "1.0", "1e2", "9" * 17):
        assert not accepts(model, grammar, text) or _valid(json.loads(text), schema), text
    values = sample_valid(model, {"type": "object", "properties": {"n": schema}, "required": ["n"]}, range(4))
    assert all(isinstance(v["n"], int) for v in values)


def test_a_le_5_field_comes_back_at_most_5(model):
    class Rating(pydantic.BaseModel):
        stars: int = pydantic.Field(ge=1, le=5)
        weight: float = pydantic.Field(gt=0, le=2)

    schema = Rating.model_json_schema()
    values = sample_valid(model, schema, range(10))
    assert all(1 <= v["stars"] <= 5 and 0 < v["weight"] <= 2 for v in values)


@pytest.mark.parametrize("bounds", [
    {"minimum": 0, "maximum": 1}, {"exclusiveMinimum": 0}, {"minimum": -3, "exclusiveMaximum": 2},
    {"exclusiveMinimum": -1, "exclusiveMaximum": 1}, {"maximum": -2}, {"minimum": 10, "maximum": 10},
])
def test_number_ranges_with_whole_bounds(model, bounds):
    schema = {"type": "number", **bounds}
    grammar = json_schema_grammar(schema)
    for text in ("0", "0.0", "0.5", "1", "1.0", "1.01", "-0.5", "-1", "-1.5", "-2", "-2.0", "-2.5", "-3", "1.99",
                 "2", "9.9", "10", "10.0", "10.1", "12345.678"):
        assert accepts(model, grammar, text) == _valid(float(text), schema), text


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "number", "minimum": 0.5}, "minimum 0.5"),
    ({"type": "number", "exclusiveMaximum": 2.25}, "exclusiveMaximum"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"type": "integer", "minimum": "1"}, "minimum"),
])
def test_inexpressible_number_bounds_are_named(schema, keyword):
    with pytest.raises(GrammarError, match=re.escape(keyword)):
        json_schema_grammar(schema)


def _valid(value: object, schema: dict) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


# -- lengths and counts -------------------------------------------------------------------------------------


def test_string_lengths_and_item_counts(model):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 4},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
        "pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}], "items": False}},
        "required": ["name", "tags", "pair"], "additionalProperties": False}
    sample_valid(model, schema, range(6))
    grammar = json_schema_grammar({"type": "string", "minLength": 2, "maxLength": 4})
    assert [accepts(model, grammar, json.dumps(s, ensure_ascii=False)) for s in ("a", "ab", "abcd", "abcde", "é𝄞")] == \
        [False, True, True, False, True]
    grammar = json_schema_grammar({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2})
    assert [accepts(model, grammar, t) for t in ("[]", "[1]", "[1, 2]", "[1,2,3]")] == [False, True, True, False]
    # a map (free keys: a random model would write keys forever, so this one is fed, not generated)
    grammar = json_schema_grammar({"type": "object", "additionalProperties": {"type": "integer", "maximum": 9},
                                   "required": ["k"], "maxProperties": 2})
    assert [accepts(model, grammar, t) for t in ('{"k": 1}', '{"k": 1, "x": 9}', '{"k": 1, "x": 10}', '{}',
                                                 '{"k": 1, "x": 2, "y": 3}')] == [True, True, False, False, False]


def test_counts_past_llama_cpps_repetition_threshold_are_exact(model):
    # llama.cpp refuses x{m} over 2,000 and reads x{m,n} with n over 2,000 as "no limit"
    grammar = json_schema_grammar({"type": "string", "minLength": 2100, "maxLength": 4096})
    assert [accepts(model, grammar, json.dumps("ab" * (n // 2) + "c" * (n % 2))) for n in (2099, 2100, 4096, 4097)] \
        == [False, True, True, False]
    grammar = json_schema_grammar({"type": "array", "items": {"const": 0}, "maxItems": 2500})
    assert [accepts(model, grammar, json.dumps([0] * n)) for n in (0, 2500, 2501)] == [True, True, False]


# -- what cannot be enforced is named ------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"not": {"type": "string"}}, "'not'"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
    ({"if": {}, "then": {}}, "'if'"),
    ({"type": "string", "format": "hostname"}, "format 'hostname'"),
    ({"type": "string", "format": "date", "maxLength": 8}, "cut into format 'date'"),
    ({"type": "string", "format": "uri", "maxLength": 100}, "maxLength 100 at # is too short"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "object", "properties": {"a": {"type": "string", "contains": {}}}}, "'contains' (at #/properties/a)"),
    ({"type": "colour"}, "'type'"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "branches 0 and 1 may both match"),
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}}, {"type": "object"}]}, "oneOf at #"),
    ({"enum": ["\ud83d"]}, "lone surrogate"),
])
def test_unsupported_keywords_raise_a_grammar_error_naming_them(schema, keyword):
    with pytest.raises(GrammarError, match=re.escape(keyword)):
        json_schema_grammar(schema)


# -- what pydantic emits -------------------------------------------------------------------------------------


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue 🔵"


class Point(pydantic.BaseModel):
    x: int = pydantic.Field(ge=-3, le=3)
    y: int | None = pydantic.Field(default=None, ge=0, lt=10)


class Cat(pydantic.BaseModel):
    kind: Literal["cat"]
    lives: int = pydantic.Field(ge=1, le=9)


class Dog(pydantic.BaseModel):
    kind: Literal["dog"]
    good: bool


class Scene(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    title: Annotated[str, pydantic.StringConstraints(max_length=6)]
    colour: Colour
    points: list[Point] = pydantic.Field(max_length=2)
    pet: Cat | Dog = pydantic.Field(discriminator="kind")
    when: datetime.date
    at: datetime.time | None = None
    stamp: datetime.datetime | None = None
    id: uuid.UUID | None = None
    code: str = pydantic.Field(pattern=r"^[A-Z]{3}$")
    note: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=3)] | None = None
    size: tuple[int, bool] | None = None


class Tree(pydantic.BaseModel):
    label: Annotated[str, pydantic.StringConstraints(max_length=3)]
    children: list[Tree] = pydantic.Field(default_factory=list, max_length=2)


@pytest.mark.parametrize("pydantic_model", [Scene, Tree, Point])
def test_pydantic_schemas_give_valid_outputs(model, pydantic_model):
    schema = pydantic_model.model_json_schema()
    for text in (generate(model, json_schema_grammar(schema), seed, 400) for seed in range(5)):
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        pydantic_model.model_validate_json(text)


def test_formats_admit_only_their_texts(model):
    class Contact(pydantic.BaseModel):
        site: pydantic.HttpUrl
        email: str = pydantic.Field(json_schema_extra={"format": "email"})
        born: datetime.date
        seen: datetime.datetime
        id: uuid.UUID

    grammar = json_schema_grammar(Contact.model_json_schema())
    good = {"site": "https://example.com/a?b=1#c", "email": "x.y@ex-ample.org", "born": "2024-02-28",
            "seen": "2024-12-31T23:59:59.5+01:00", "id": str(uuid.UUID(int=7))}
    assert accepts(model, grammar, json.dumps(good))
    Contact.model_validate(good)
    for field, bad in (("site", "ftp://x"), ("site", "https://" + "a" * 64), ("site", "http://a/" + "b" * 2000),
                       ("email", "a@b"), ("born", "2023-02-30"), ("born", "2023-04-31"), ("born", "0999-01-01"),
                       ("seen", "2024-01-01T24:00:00Z"), ("seen", "2024-01-01T10:00:00"), ("id", "1234")):
        assert not accepts(model, grammar, json.dumps({**good, field: bad})), (field, bad)


def test_ordinary_pydantic_schema_costs_little_more_per_token_than_none(model):
    # measured for the report: ms per sampled token over the 131k vocabulary, with and without Scene's grammar
    grammar = json_schema_grammar(Scene.model_json_schema())
    timings = {}
    for name, g in (("none", None), ("Scene", grammar)):
        with Sampler(model, RANDOM.__class__(**{**RANDOM.__dict__, "seed": 1}), grammar=g) as sampler:
            model.clear()
            model.eval_tokens(model.tokenize(PROMPT))
            spent, n = 0.0, 0
            for _ in range(40):
                started = time.perf_counter()
                token = sampler.sample()
                spent, n = spent + time.perf_counter() - started, n + 1
                if model.is_end_of_generation(token):
                    break
                model.eval_tokens([token])
        timings[name] = 1000 * spent / n
    print(f"sampling ms/token: {timings}")
    assert timings["Scene"] < 150, timings


def test_sets_of_enum_values_hold_each_at_most_once(model):
    class Tags(pydantic.BaseModel):
        colours: set[Colour]
        sizes: frozenset[Literal[1, 2, 3]] = pydantic.Field(min_length=1)

    schema = Tags.model_json_schema()
    values = sample_valid(model, schema, range(8))
    assert any(len(v["colours"]) > 1 for v in values)  # the seeds do write several
    grammar = json_schema_grammar(schema)
    assert accepts(model, grammar, '{"colours": ["red", "blue 🔵"], "sizes": [1, 3]}')
    assert not accepts(model, grammar, '{"colours": ["red", "red"], "sizes": [1]}')
    assert not accepts(model, grammar, '{"colours": [], "sizes": []}')  # min_length=1


def test_durations_as_pydantic_writes_timedelta(model):
    class Wait(pydantic.BaseModel):
        wait: datetime.timedelta

    grammar = json_schema_grammar(Wait.model_json_schema())
    for delta in (datetime.timedelta(days=2, hours=3, seconds=4.5), datetime.timedelta(seconds=0),
                  datetime.timedelta(minutes=90), -datetime.timedelta(days=1)):
        text = Wait(wait=delta).model_dump_json()
        assert accepts(model, grammar, text.replace(":", ": ", 1)), text
    for bad in ("P", "PT", "P1H", "1D", "PT1S2M"):
        assert not accepts(model, grammar, json.dumps({"wait": bad})), bad


# -- the PixtralModel API -------------------------------------------------------------------------------------


def test_pixtral_model_json_schema_follows_the_fixes(pair):
    schema = {"type": "object", "properties": {"mood": {"enum": EMOJI}, "stars": {"type": "integer", "maximum": 5,
                                                                                    "minimum": 0},
                                               "code": {"type": "string", "pattern": "^[0-9]{2}$"}},
              "required": ["mood", "stars", "code"]}
    image = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with PixtralModel.load(pair[0], options=ModelOptions(n_ctx=2048, threads=2)) as pixtral:
        for seed in range(3):
            result = pixtral.describe(image, "Describe as JSON.", max_tokens=300, temperature=1.0, seed=seed,
                                      json_schema=schema)
            value = result.json()
            jsonschema.validate(value, schema)
            assert value["mood"] in EMOJI and "\ufffd" not in result.text
        with pytest.raises(GrammarError, match="uniqueItems"):
            pixtral.describe(image, "x", options=GenerationOptions(
                json_schema={"type": "array", "uniqueItems": True}))


# -- the server's response_format ---------------------------------------------------------------------------


def _parse(response_format: dict) -> GenerationOptions:
    body = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format}
    return parse_chat_request(json.dumps(body).encode(), ServerConfig()).options


def test_llama_servers_json_object_with_a_schema_is_honoured():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}, "required": ["n"]}
    assert _parse({"type": "json_object", "schema": schema}).json_schema == schema
    assert _parse({"type": "json_object"}).json_schema == {"type": "object"}
    with pytest.raises(RequestError) as caught:
        _parse({"type": "json_object", "schema": {"type": "array", "uniqueItems": True}})
    assert caught.value.status == 400 and "uniqueItems" in caught.value.message


@pytest.mark.parametrize("schema", [{"not": {}}, {"type": "number", "maximum": 0.5},
                                    {"type": "string", "format": "ipv4"}, {"type": "string", "pattern": "(?!x)"}])
def test_an_unsupported_schema_is_a_400_in_openais_shape(schema):
    with pytest.raises(RequestError) as caught:
        _parse({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    body = caught.value.body()["error"]
    assert caught.value.status == 400
    assert body["type"] == "invalid_request_error" and body["param"] == "response_format"
    assert body["message"].startswith("cannot turn the JSON schema into a grammar: ")
    # a GrammarError raised later (the worker converts the schema again) gets the same answer
    with pytest.raises(GrammarError) as raised:
        json_schema_grammar(schema)
    assert request_error_from(raised.value).status == 400
