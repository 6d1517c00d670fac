"""Token sampling through a llama.cpp sampler chain, optionally constrained by a GBNF grammar."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from pixtral_cpp.backend._native import bindings, log_listener
from pixtral_cpp.backend.json_schema import SchemaError, schema_to_gbnf
from pixtral_cpp.backend.text import TextModel
from pixtral_cpp.errors import BackendError, PixtralError
from pixtral_cpp.quiet_stderr import capture_stderr

logger = logging.getLogger("pixtral_cpp.llama")

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp's dist sampler would draw a seed of its own
_MIN_KEEP = 1  # top-p and min-p keep at least this many candidates (llama.cpp's common default)

# struct llama_token_data in llama.h: {llama_token id; float logit; float p;}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

_RULE_NAME = re.compile(r"[a-zA-Z0-9-]+")  # what llama.cpp's GBNF parser accepts as a rule name

# What a JSON schema may cost. llama.cpp's grammar sampler matches every one of the 131,072 tekken tokens
# against each alternative alive at the current position: over that vocabulary (2-core x86 CPU) an
# ordinary pydantic-style schema (40 rules, 16 alternatives) costs 10-45 ms per sampled token, like
# {"type": "object"}, while each alternative alive at once adds about 0.35 ms: an enum of 1,000 words
# with a common prefix costs 360 ms per token, 3,000 cost 1.3 s, 60,000 about 28 s.
MAX_SCHEMA_BOUND = 4096  # one maxLength/maxItems/pattern count: the converter spells out each repetition
MAX_SCHEMA_REPETITIONS = 4 * MAX_SCHEMA_BOUND  # all of a schema's bounds together (~10 grammar bytes each)
MAX_SCHEMA_BYTES = 128_000  # the schema as JSON text: bounds the converter's own time and memory
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays
MAX_GRAMMAR_ALTERNATIVES = 512  # enum values, const/anyOf/oneOf branches, pattern choices: <= ~180 ms a token
MAX_GRAMMAR_RULES = 1024  # each is parsed and kept by llama.cpp for the whole answer
MAX_GRAMMAR_BYTES = 256_000

_SCHEMA_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")  # x{m}, x{m,}, x{m,n}
_LITERAL_OR_CLASS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')  # where '|' is not a choice
_RULE_START = re.compile(r"^[a-zA-Z0-9-]+\s*::=", re.MULTILINE)


class SamplingError(PixtralError, ValueError):
    """A sampling option, grammar or JSON schema that cannot be used; the message names the value."""


class GrammarError(SamplingError):
    """llama.cpp cannot parse the GBNF grammar, or the JSON schema cannot be turned into one."""


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick the next token; llama.cpp's own defaults except the temperature."""

    temperature: float = 0.7  # 0: greedy (argmax)
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off; > 1 makes tokens among the last repeat_last_n less likely
    repeat_last_n: int = 64
    seed: int | None = None  # None: a random seed per Sampler

    def __post_init__(self) -> None:
        _require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
                 "a finite number >= 0 (0 is greedy)")
        _require(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 is off)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1] (1 is off)")
        _require(0 <= self.min_p < 1, "min_p", self.min_p, "in [0, 1) (0 is off)")
        _require(math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0, "repeat_penalty",
                 self.repeat_penalty, "a finite number > 0 (1 is off)")
        _require(self.repeat_last_n >= 0, "repeat_last_n", self.repeat_last_n, "an integer >= 0")
        _require(self.seed is None or 0 <= self.seed < _DEFAULT_SEED, "seed", self.seed,
                 f"None or an integer in [0, {_DEFAULT_SEED - 1}]")


def _require(ok: bool, name: str, value: object, domain: str) -> None:
    if not ok:  # `not ok` rather than `ok is False`: NaN comparisons are False too
        raise SamplingError(f"{name} must be {domain}, got {value!r}")


class Sampler:
    """Owns a llama.cpp sampler chain that picks tokens from ``text_model``'s last logits.

    Stages, in order: repetition penalty, grammar, top-k, top-p, min-p, temperature, then a seeded draw
    (greedy instead of the truncations and the draw when the temperature is 0). The grammar comes before
    the truncations so that they choose among tokens the grammar allows: after top-k, none might be.
    """

    def __init__(
        self,
        text_model: TextModel,
        options: SamplingOptions | None = None,
        *,
        grammar: str | None = None,
        grammar_root: str = "root",
    ) -> None:
        self.text_model = text_model
        self.options = options or SamplingOptions()
        self.seed: int = self.options.seed if self.options.seed is not None else _random_seed()
        self._llama, _ = bindings()
        text_model._handles()  # fail early on a closed model
        # (n_vocab,) llama_token_data records handed to the chain at every sample()
        self._candidates = np.zeros(text_model.n_vocab, dtype=_TOKEN_DATA)
        self._token_ids = np.arange(text_model.n_vocab, dtype=np.int32)
        params = self._llama.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = self._llama.llama_sampler_chain_init(params)
        if not self._chain:
            raise BackendError("llama.cpp could not create a sampler chain")
        # The chain owns and frees every stage added to it.
        self._finalizer = weakref.finalize(self, self._llama.llama_sampler_free, self._chain)
        try:
            self._add_stages(grammar, grammar_root)
        except BaseException:
            self.close()
            raise
        # The grammar stage points into the model's vocabulary: close the sampler with the model.
        text_model._register_dependent(self)

    def _add_stages(self, grammar: str | None, grammar_root: str) -> None:
        llama, opts = self._llama, self.options
        if opts.repeat_penalty != 1.0:
            self._add(llama.llama_sampler_init_penalties(
                self.text_model.n_vocab, opts.repeat_last_n, opts.repeat_penalty, 0.0, 0.0), "penalties")
        if grammar is not None:
            self._add(self._grammar_stage(grammar, grammar_root), "grammar")
        if opts.temperature == 0:
            self._add(llama.llama_sampler_init_greedy(), "greedy")
            return
        if opts.top_k > 0:
            self._add(llama.llama_sampler_init_top_k(opts.top_k), "top-k")
        if opts.top_p < 1:
            self._add(llama.llama_sampler_init_top_p(opts.top_p, _MIN_KEEP), "top-p")
        if opts.min_p > 0:
            self._add(llama.llama_sampler_init_min_p(opts.min_p, _MIN_KEEP), "min-p")
        self._add(llama.llama_sampler_init_temp(opts.temperature), "temperature")
        self._add(llama.llama_sampler_init_dist(self.seed), "dist")

    def _add(self, stage: int | None, name: str) -> None:
        if not stage:
            raise BackendError(f"llama.cpp could not create the {name} sampler")
        self._llama.llama_sampler_chain_add(self._chain, stage)

    def _grammar_stage(self, grammar: str, root: str) -> int:
        """llama.cpp's grammar sampler, or GrammarError with the parser's reason (llama.cpp returns NULL)."""
        if not grammar.strip():
            # llama.cpp takes an empty grammar as "no grammar" and would constrain nothing.
            raise GrammarError("the grammar is empty")
        if not _RULE_NAME.fullmatch(root):
            raise GrammarError(f"grammar_root must be a rule name (letters, digits, '-'), got {root!r}")
        model, _ = self.text_model._handles()
        vocab = self._llama.llama_model_get_vocab(model)
        logged: list[str] = []
        with log_listener(logged.append), capture_stderr() as printed:
            stage = self._llama.llama_sampler_init_grammar(vocab, grammar.encode(), root.encode())
        if printed:
            logger.debug("llama.cpp's grammar parser wrote: %s", "".join(printed))
        if not stage:
            raise GrammarError(f"llama.cpp rejected the grammar: {_grammar_reason(printed + logged)}")
        return stage

    def sample(self) -> int:
        """Pick a token from the logits of the last evaluated position and record it in the chain."""
        if self.closed:
            raise BackendError("the sampler is closed")
        _, ctx = self.text_model._handles()
        logits = self._llama.llama_get_logits_ith(ctx, -1)
        if not logits:  # llama_sampler_sample would assert, aborting the process
            raise BackendError("there are no logits to sample from: evaluate at least one token first")
        # llama_sampler_sample() in Python, so that we can look before accepting: when the grammar rules
        # out every token, llama.cpp would pick one anyway and the grammar's accept would throw a C++
        # exception through the C API, which terminates the process.
        candidates = self._candidates  # refilled whole: the last call's stages sorted it in place
        candidates["id"] = self._token_ids
        candidates["logit"] = np.ctypeslib.as_array(logits, shape=(len(candidates),))
        candidates["p"] = 0.0
        array = self._llama.llama_token_data_array(
            data=candidates.ctypes.data_as(self._llama.llama_token_data_p),
            size=len(candidates), selected=-1, sorted=False,
        )
        self._llama.llama_sampler_apply(self._chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise BackendError("the sampler chain selected no token")
        chosen = array.data[array.selected]  # stages may sort or shrink the array: read it through `data`
        if chosen.logit == -math.inf:
            raise GrammarError("the grammar allows no token at this point (e.g. it requires a NUL character)")
        self._llama.llama_sampler_accept(self._chain, chosen.id)
        return int(chosen.id)

    def reset(self) -> None:
        """Forget the sampled tokens (penalty history, grammar state) and restart the seeded draws."""
        if self.closed:
            raise BackendError("the sampler is closed")
        self.text_model._handles()  # the grammar reset re-reads the model's vocabulary
        self._llama.llama_sampler_reset(self._chain)

    def close(self) -> None:
        """Free the sampler chain (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % _DEFAULT_SEED


def _grammar_reason(messages: list[str]) -> str:
    """The parser's own complaint: the first line written (later lines echo the whole grammar)."""
    lines = (line.strip() for message in messages for line in message.splitlines())
    reason = next((line for line in lines if line), "no details were logged")
    return reason.removeprefix("parse: ")


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """GBNF grammar that only lets the model write JSON valid under ``schema`` (a dict or JSON text).

    Schemas over the cost limits above raise GrammarError naming the limit, before and after conversion.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    _schema_text(schema)
    try:
        grammar = schema_to_gbnf(schema)
    except SchemaError as exc:
        raise GrammarError(f"cannot turn the JSON schema into a grammar: {exc}") from exc
    except RecursionError as exc:  # $ref chains the depth check cannot see
        raise GrammarError("cannot turn the JSON schema into a grammar: its references nest too deeply") from exc
    _check_grammar_cost(grammar)
    return grammar


def _schema_text(schema: dict[str, Any]) -> str:
    """The schema as JSON for the converter, once its size, depth and repetition bounds are in limits."""
    repetitions = _schema_repetitions(schema, 0)
    if repetitions > MAX_SCHEMA_REPETITIONS:
        raise GrammarError(f"the JSON schema's length, item and pattern bounds add up to {repetitions:,} "
                           f"repetitions, over the limit of {MAX_SCHEMA_REPETITIONS:,}: use smaller bounds")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:  # a set, an object, a circular reference
        raise GrammarError(f"the JSON schema is not JSON data: {exc}") from exc
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the JSON schema is {len(text):,} bytes of JSON, over the limit of "
                           f"{MAX_SCHEMA_BYTES:,}: describe the answer with fewer or shorter parts")
    return text


def _schema_repetitions(node: Any, depth: int) -> int:
    """The sum of the repetition bounds in `node`; GrammarError for one over MAX_SCHEMA_BOUND."""
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    total = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _SCHEMA_BOUNDS and isinstance(value, int) and not isinstance(value, bool):
                total += _bounded(key, value)
            elif key == "pattern" and isinstance(value, str):
                total += _pattern_repetitions(value)
            total += _schema_repetitions(value, depth + 1)
    elif isinstance(node, list):
        total = sum(_schema_repetitions(item, depth + 1) for item in node)
    return total


def _pattern_repetitions(pattern: str) -> int:
    """The counts of a regex's x{m}, x{m,} and x{m,n}: the converter writes x out that many times."""
    total = 0
    for counts in _PATTERN_COUNT.findall(pattern):
        digits = max((d.lstrip("0") or "0" for d in counts if d), key=lambda d: (len(d), d))
        if len(digits) > 9:  # over any limit, and int() refuses past 4300 digits
            raise GrammarError(f"JSON schema pattern count {digits[:20]} is over the limit of {MAX_SCHEMA_BOUND:,}")
        total += _bounded("pattern count", int(digits))
    return total


def _bounded(name: str, value: int) -> int:
    if value > MAX_SCHEMA_BOUND:
        raise GrammarError(f"JSON schema {name} {value:,} is over the limit of {MAX_SCHEMA_BOUND:,}: the grammar "
                           "would spell out every repetition")
    return max(value, 0)


def _check_grammar_cost(grammar: str) -> None:
    """Refuse a grammar that would make every sampled token slow, or fill memory."""
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the JSON schema gives a grammar of {len(grammar):,} bytes, over the limit of "
                           f"{MAX_GRAMMAR_BYTES:,}: use fewer properties or smaller bounds")
    rules = len(_RULE_START.findall(grammar))
    if rules > MAX_GRAMMAR_RULES:
        raise GrammarError(f"the JSON schema gives a grammar of {rules:,} rules, over the limit of "
                           f"{MAX_GRAMMAR_RULES:,}: use fewer properties, anyOf branches or definitions")
    choices = [line.count("|") for line in _LITERAL_OR_CLASS.sub("", grammar).splitlines()]
    alternatives = sum(bars + 1 for bars in choices if bars)  # a rule with n bars offers n + 1
    if alternatives > MAX_GRAMMAR_ALTERNATIVES:
        raise GrammarError(f"the JSON schema gives a grammar of {alternatives:,} alternatives (enum values, "
                           f"const/anyOf/oneOf branches, pattern choices), over the limit of "
                           f"{MAX_GRAMMAR_ALTERNATIVES:,}: each costs time at every generated token")

