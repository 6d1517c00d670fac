"""Token sampling through a llama.cpp sampler chain, optionally constrained by a GBNF grammar."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pixtral_cpp.backend._native import bindings, log_listener, schema_converter
from pixtral_cpp.backend.text import TextModel
from pixtral_cpp.errors import BackendError, PixtralError

logger = logging.getLogger("pixtral_cpp.llama")

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp's dist sampler would draw a seed of its own
_MIN_KEEP = 1  # top-p and min-p keep at least this many candidates (llama.cpp's common default)

# llama-cpp-python 0.3.36's converter still lets a string hold raw control characters, which JSON forbids
# (json.loads rejects them); llama.cpp's own converter (common/json-schema-to-grammar.cpp) excludes them.
_STALE_CHAR_RULE = r'char ::= [^"\\] | "\\" (["\\/bfnrt] | "u"' + " [0-9a-fA-F]" * 4 + ")"
_JSON_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'

# struct llama_token_data in llama.h: {llama_token id; float logit; float p;}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

_RULE_NAME = re.compile(r"[a-zA-Z0-9-]+")  # what llama.cpp's GBNF parser accepts as a rule name


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
        with log_listener(logged.append), _stderr_captured() as printed:
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


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what C code writes to file descriptor 2 meanwhile: llama.cpp's grammar parser reports
    syntax errors with fprintf(stderr) rather than through its log callback."""
    printed: list[str] = []
    _STDERR_LOCK.acquire()  # fd 2 is process-wide: two builds at once would restore the wrong one
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield printed
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                text = sink.read().decode("utf-8", errors="replace")
                if text.strip():
                    printed.append(text)
    finally:
        os.close(saved)
        _STDERR_LOCK.release()


def _grammar_reason(messages: list[str]) -> str:
    """The parser's own complaint: the first line written (later lines echo the whole grammar)."""
    lines = (line.strip() for message in messages for line in message.splitlines())
    reason = next((line for line in lines if line), "no details were logged")
    return reason.removeprefix("parse: ")


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """GBNF grammar that only lets the model write JSON valid under ``schema`` (a dict or JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    converter = _schema_converter()
    try:
        grammar = converter(json.dumps(schema))
    # The converter reports unsupported or broken schemas with asserts and whatever the code hits.
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        reason = str(exc) or type(exc).__name__
        raise GrammarError(f"cannot turn the JSON schema into a grammar: {reason}") from exc
    return "\n".join(_JSON_CHAR_RULE if line == _STALE_CHAR_RULE else line for line in grammar.splitlines())


def _schema_converter() -> Any:
    """llama-cpp-python's pure-Python JSON-schema-to-GBNF converter."""
    return schema_converter()
