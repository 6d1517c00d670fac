"""Sampling, grammars and streaming detokenization with real llama.cpp on the tiny random Pixtral."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest

from pixtral_cpp.backend import (
    GrammarError,
    IncrementalDecoder,
    Sampler,
    SamplingError,
    SamplingOptions,
    TextModel,
    TextModelOptions,
    json_schema_grammar,
)
from pixtral_cpp.backend.sampling import MAX_GRAMMAR_ALTERNATIVES, MAX_SCHEMA_BOUND, MAX_SCHEMA_BYTES
from pixtral_cpp.errors import BackendError, ModelError, PixtralError

PROMPT = "Describe the picture in JSON."
EOS = 2
# The requested schema, with a length limit on the string: a random model closes a free string only by
# chance (one token in ~1000), so without it generation would rarely finish within the token budget.
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "count": {"type": "integer"}},
    "required": ["name", "count"],
}
RANDOM = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # every token possible


@pytest.fixture(scope="module")
def model(converted):
    text_path, _ = converted("F32")
    with TextModel(text_path, TextModelOptions(n_ctx=512, flash_attn="off")) as text_model:
        yield text_model


def start(model: TextModel) -> np.ndarray:
    """Evaluate the prompt on an empty cache; logits of its last position."""
    model.clear()
    return model.eval_tokens(model.tokenize(PROMPT))


def generate(model: TextModel, sampler: Sampler, n: int) -> list[int]:
    """Up to ``n`` sampled tokens after the prompt, stopping after an end-of-generation token."""
    start(model)
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(sampler.sample())
        if model.is_end_of_generation(tokens[-1]):
            break
        model.eval_tokens(tokens[-1:])
    return tokens


def answer_text(model: TextModel, tokens: list[int]) -> str:
    decoder = IncrementalDecoder()
    return "".join(decoder.feed(model.token_piece(t)) for t in tokens) + decoder.flush()


# -- choosing tokens -------------------------------------------------------------------------------


def test_greedy_is_the_argmax_of_the_logits(model):
    with Sampler(model, SamplingOptions(temperature=0)) as sampler:
        logits = start(model)
        for _ in range(6):
            token = sampler.sample()
            assert token == int(np.argmax(logits))
            logits = model.eval_tokens([token])


def test_a_seed_fixes_the_sequence(model):
    def run(seed: int) -> list[int]:
        with Sampler(model, SamplingOptions(**{**vars(RANDOM), "seed": seed})) as sampler:
            return generate(model, sampler, 20)

    first = run(7)
    assert len(first) == 20
    assert run(7) == first
    assert run(8) != first


def test_reset_restarts_the_seeded_draws(model):
    with Sampler(model, SamplingOptions(temperature=1.0, seed=11)) as sampler:
        first = generate(model, sampler, 8)
        sampler.reset()
        assert generate(model, sampler, 8) == first


def test_unseeded_samplers_draw_their_own_seeds(model):
    with Sampler(model) as a, Sampler(model) as b, Sampler(model, SamplingOptions(seed=5)) as fixed:
        assert a.seed != b.seed  # two random 32-bit seeds collide with probability 2**-32
        assert fixed.seed == 5


def test_top_k_1_is_greedy(model):
    with Sampler(model, SamplingOptions(temperature=0)) as greedy:
        expected = generate(model, greedy, 8)
    with Sampler(model, SamplingOptions(temperature=1.5, top_k=1, seed=3)) as top1:
        assert generate(model, top1, 8) == expected


@pytest.mark.parametrize("penalty", [1.0, 50.0])
def test_repeat_penalty_makes_the_last_token_less_likely(model, penalty):
    """Sample twice from the same logits: the penalty now applies to the first pick (llama.cpp divides
    positive logits by it and multiplies negative ones)."""
    with Sampler(model, SamplingOptions(temperature=0, repeat_penalty=penalty)) as sampler:
        logits = start(model)
        first, second = sampler.sample(), sampler.sample()
    penalized = logits.copy()
    penalized[first] = logits[first] / penalty if logits[first] > 0 else logits[first] * penalty
    assert first == int(np.argmax(logits))
    assert second == int(np.argmax(penalized))
    assert (second == first) == (penalty == 1.0)


# -- grammars --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_json_schema_grammar_constrains_a_random_model(model, seed):
    grammar = json_schema_grammar(SCHEMA)
    with Sampler(model, SamplingOptions(temperature=1.0, seed=seed), grammar=grammar) as sampler:
        tokens = generate(model, sampler, 80)
    assert model.is_end_of_generation(tokens[-1]), "the grammar did not complete within 80 tokens"
    text = answer_text(model, tokens)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_schema_strings_exclude_raw_control_characters():
    # JSON forbids them (llama-cpp-python's converter allowed them).
    grammar = json_schema_grammar('{"type": "string"}')
    assert grammar.split("char ::=")[1].splitlines()[0].startswith(r" [ !#-\[\]-~\x80-")  # from the space on


@pytest.mark.parametrize(
    ("grammar", "root", "reason"),
    [
        ('root ::= "a" | (', "root", "expecting ')'"),
        ("root ::= undefined-rule", "root", "Undefined rule identifier 'undefined-rule'"),
        ('root ::= root "a"', "root", "left recursion"),
        ('answer ::= "a"', "root", "does not contain a 'root' symbol"),
        ("   ", "root", "empty"),
        ('root ::= "a"', "not a name!", "grammar_root"),
    ],
)
def test_a_bad_grammar_is_a_grammar_error(model, capfd, grammar, root, reason):
    with pytest.raises(GrammarError, match=re.escape(reason)):
        Sampler(model, grammar=grammar, grammar_root=root)
    assert capfd.readouterr().err == ""  # the parser's fprintf(stderr) is captured into the message


def test_a_grammar_that_allows_nothing_is_an_error_not_an_abort(model):
    with Sampler(model, SamplingOptions(temperature=0), grammar=r'root ::= "\x00"') as sampler:
        start(model)
        with pytest.raises(GrammarError, match="allows no token"):
            sampler.sample()


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "colour"}, "'type' at # must be one of"),
        ({"$ref": "#/$defs/missing"}, "points to nothing in the schema"),
        ({"type": "string", "pattern": "(?=abc)"}, "lookaround"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_a_bad_json_schema_is_a_grammar_error(schema, reason):
    with pytest.raises(GrammarError, match=reason) as caught:
        json_schema_grammar(schema)
    assert isinstance(caught.value, PixtralError)


# -- what a schema may cost --------------------------------------------------------------------------

# A pydantic-style model: nested object, optional and nullable fields, an enum, a bounded array.
ORDINARY_SCHEMA = {
    "type": "object",
    "properties": {
        "number": {"type": "string", "maxLength": 20}, "date": {"type": "string", "format": "date"},
        "customer": {"type": "object", "properties": {"name": {"type": "string"},
                                                      "address": {"type": ["string", "null"]}},
                     "required": ["name"]},
        "status": {"enum": ["draft", "sent", "paid", "void"]},
        "items": {"type": "array", "maxItems": 50, "items": {
            "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                                             "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["sku", "qty"]}},
        "total": {"type": "number"}, "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["number", "date", "customer", "items", "total"],
}


def _nested_arrays(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"enum": [f"word{i}" for i in range(MAX_GRAMMAR_ALTERNATIVES + 1)]}, "alternatives"),
        ({"anyOf": [{"const": f"c{i}"} for i in range(MAX_GRAMMAR_ALTERNATIVES + 1)]}, "alternatives"),
        ({"type": "string", "pattern": "^(" + "|".join(f"w{i}" for i in range(600)) + ")$"}, "alternatives"),
        ({"enum": [f"word{i}" for i in range(60_000)]}, f"bytes of JSON, over the limit of {MAX_SCHEMA_BYTES:,}"),
        ({"type": "string", "maxLength": MAX_SCHEMA_BOUND + 1}, "maxLength 4,097 is over the limit of 4,096"),
        ({"type": "string", "pattern": "^a{0,99999999999999999999}$"}, "pattern count 99999999999999999999"),
        ({"type": "string", "pattern": "^a{5000}$"}, "pattern count 5,000"),
        ({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 4000} for i in range(5)}},
         "add up to 20,000 repetitions"),
        ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1100)},
          "required": [f"p{i}" for i in range(1100)]}, "rules, over the limit of 1,024"),
        # each '"' in an enum value is 2 bytes of schema and 4 of grammar (the JSON escape, escaped for GBNF)
        ({"enum": ['"' * 124 + str(i) for i in range(500)]}, "bytes, over the limit of 256,000"),
        (_nested_arrays(70), "nested more than 64"),
    ],
    ids=["enum", "anyOf", "pattern-choices", "schema-bytes", "bound", "huge-pattern-count", "pattern-count",
         "bounds-total", "rules", "grammar-bytes", "depth"],
)
def test_a_schema_over_a_cost_limit_is_refused_naming_it(schema, reason):
    started = time.monotonic()
    with pytest.raises(GrammarError, match=re.escape(reason)):
        json_schema_grammar(schema)
    assert time.monotonic() - started < 1.0  # refused before the converter could spend long


def test_ordinary_schemas_are_far_below_the_limits(model):
    for schema in (ORDINARY_SCHEMA, {"type": "object"},
                   {"enum": [f"word{i}" for i in range(MAX_GRAMMAR_ALTERNATIVES - 1)]},
                   {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(200)}}):
        grammar = json_schema_grammar(schema)
        with Sampler(model, SamplingOptions(temperature=0), grammar=grammar) as sampler:
            start(model)
            sampler.sample()


# -- options and lifetime ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0),
        ("top_p", 1.5), ("min_p", 1.0), ("repeat_penalty", 0.0), ("repeat_last_n", -1),
        ("seed", -1), ("seed", 2**32 - 1),
    ],
)
def test_invalid_sampling_options_name_the_value(field, value):
    with pytest.raises(SamplingError, match=f"{field} must be .* got {value!r}") as caught:
        SamplingOptions(**{field: value})
    assert isinstance(caught.value, (PixtralError, ValueError))


def test_sampling_without_logits_is_an_error_not_an_abort(model):
    with Sampler(model, SamplingOptions(temperature=0)) as sampler:
        model.clear()
        model.decode_embeddings(np.zeros((1, model.n_embd), np.float32))  # evaluates without logits
        with pytest.raises(BackendError, match="no logits"):
            sampler.sample()


def test_closing_the_model_closes_its_samplers(converted):
    text_path, _ = converted("F32")
    text_model = TextModel(text_path, TextModelOptions(n_ctx=64))
    sampler = Sampler(text_model, grammar=json_schema_grammar({"type": "object"}))
    text_model.close()
    assert sampler.closed
    with pytest.raises(BackendError, match="closed"):
        sampler.sample()


# -- tokens and text -------------------------------------------------------------------------------


def test_end_of_generation_and_control_pieces(model):
    assert model.is_end_of_generation(EOS)
    assert not model.is_end_of_generation(model.tokenize("a", add_special=False)[0])
    assert model.token_piece(EOS) == b""  # "</s>" never reaches the answer
    assert model.token_piece(model.token_id("[INST]")) == b""
    assert model.token_piece(model.tokenize(" hello", add_special=False)[0]).startswith(b" h")
    with pytest.raises(ModelError, match="outside the vocabulary"):
        model.token_piece(model.n_vocab)


def test_incremental_decoder_never_splits_a_character(model):
    text = "日本語 🎉"
    pieces = [model.token_piece(t) for t in model.tokenize(text, add_special=False)]
    # The test proves something only if tekken really splits a character across tokens.
    assert any(not _is_utf8(piece) for piece in pieces)
    decoder = IncrementalDecoder()
    chunks = [decoder.feed(piece) for piece in pieces]
    assert "".join(chunks) + decoder.flush() == text
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "" in chunks  # a piece that ends inside the emoji yields nothing yet


def test_incremental_decoder_flushes_an_incomplete_character_as_a_replacement():
    decoder = IncrementalDecoder()
    assert decoder.feed("é🎉".encode()[:-1]) == "é"
    assert decoder.pending == "🎉".encode()[:-1]
    assert decoder.flush() == "\ufffd"
    assert decoder.feed(b"ok") == "ok"  # usable again after a flush


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
