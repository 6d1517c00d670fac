"""Prompt text tokenized exactly as mistral-common does, from the text GGUF's own vocabulary.

llama.cpp does not split text as tekken does: pre-tokenizer `pixtral` (what llama.cpp's converter writes)
selects its Llama-3 regex, which cuts words after an apostrophe differently (`O'Donnell`, `didn't`), and even
its `tekken` regex groups Indic combining marks differently (`हिन्दी`: 4 tokens in this build, mistral-common 3).
mistral-common's Tekkenizer is tiktoken over tekken's split pattern with rank = token id - the number of
control tokens; `TekkenTokenizer` is the same tiktoken over the same ranks, read back from the GGUF's
`tokenizer.ggml.tokens` (GPT-2 byte strings), so its ids are mistral-common's for any text.

A vocabulary is tekken-shaped (eligible) when:
* `tokenizer.ggml.model` is `gpt2` and every token has a type;
* it starts with a run of control tokens holding Pixtral's chat tokens at Pixtral's ids, and every token after
  the run is a normal token whose string is GPT-2 byte-level;
* the first 256 normal tokens are the single bytes 0..255 in order, no two tokens have the same bytes, and
  every longer token is the merge of two tokens of lower rank (ids in merge order, as BPE ranks must be).
The pre-tokenizer name is not consulted: tekken's pattern is Pixtral's whatever a converter called it.
Any other vocabulary is tokenized by llama.cpp, with a warning.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from pathlib import Path

import gguf
import tiktoken

from pixtral_cpp.backend import TextModel
from pixtral_cpp.byte_tokens import strings_to_bytes
from pixtral_cpp.gguf_file import read_gguf_header

logger = logging.getLogger(__name__)

# tekken's split rule, the `config.pattern` of mistral-common's tekken_240911.json (tests check it).
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Control tokens of Pixtral's tekken (mistral-common's Tekkenizer.DEPRECATED_SPECIAL_TOKENS) at their ids.
PIXTRAL_CONTROL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10,
                       "[IMG_BREAK]": 12, "[IMG_END]": 13}
_CONTROL, _NORMAL = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)

Tokenize = Callable[[str], list[int]]


class NotTekkenVocabulary(Exception):
    """The GGUF's vocabulary is not tekken-shaped; the message says why."""


class TekkenTokenizer:
    """Plain text to token ids as mistral-common's Tekkenizer.encode(text, bos=False, eos=False) gives them.

    Control tokens are never produced: "[INST]" typed by a user stays text, as in mistral-common.
    """

    def __init__(self, ranks: dict[bytes, int], n_control: int) -> None:
        # tiktoken (Rust) keeps its own tables; the Python dict stays referenced by tiktoken.Encoding.
        self._encoding = tiktoken.Encoding("tekken", pat_str=TEKKEN_PATTERN, mergeable_ranks=ranks,
                                           special_tokens={})
        self.n_control = n_control

    @classmethod
    def from_vocabulary(cls, model: object, tokens: Sequence[str], types: Sequence[int]) -> TekkenTokenizer:
        """From a GGUF's tokenizer model, token strings and token types; NotTekkenVocabulary if not eligible."""
        n_control = _check_control_tokens(model, tokens, types)
        return cls(_ranks(tokens[n_control:], n_control), n_control)

    @classmethod
    def from_gguf(cls, path: Path | str) -> TekkenTokenizer:
        """From a text GGUF's header; NotTekkenVocabulary if its vocabulary is not tekken-shaped."""
        header = read_gguf_header(path)
        keys = gguf.Keys.Tokenizer
        return cls.from_vocabulary(header.get(keys.MODEL), header.get(keys.LIST) or [],
                                   header.get(keys.TOKEN_TYPE) or [])

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS, no EOS, no control tokens."""
        n_control = self.n_control
        return [rank + n_control for rank in self._encoding.encode_ordinary(text)]


def prompt_tokenizer(text: TextModel) -> Tokenize:
    """How the prompt builder tokenizes text for this model: tekken's rule if the vocabulary allows it,
    else llama.cpp's tokenizer (logged: some words then split differently from mistral-common)."""
    try:
        return TekkenTokenizer.from_gguf(text.path).encode
    except NotTekkenVocabulary as exc:
        logger.warning("%s: %s; prompt text is tokenized by llama.cpp, whose tokens may differ from "
                       "mistral-common's", text.path, exc)
    return lambda piece: text.tokenize(piece, add_special=False, parse_special=False)


def _check_control_tokens(model: object, tokens: Sequence[str], types: Sequence[int]) -> int:
    """The number of leading control tokens, after checking the shape around them."""
    if model != "gpt2":
        raise NotTekkenVocabulary(f"tokenizer model {model!r} is not gpt2 (byte-level BPE)")
    if len(types) != len(tokens):
        raise NotTekkenVocabulary(f"{len(tokens)} tokens but {len(types)} token types")
    n_control = next((index for index, kind in enumerate(types) if kind != _CONTROL), len(types))
    for name, index in PIXTRAL_CONTROL_IDS.items():
        if index >= n_control or tokens[index] != name:
            found = repr(tokens[index]) if index < len(tokens) else "nothing"
            raise NotTekkenVocabulary(f"control token {name} is not at id {index} ({found} is)")
    if len(tokens) - n_control < 256:
        raise NotTekkenVocabulary(f"only {len(tokens) - n_control} tokens follow the {n_control} control tokens")
    stray = next((n_control + i for i, kind in enumerate(types[n_control:]) if kind != _NORMAL), None)
    if stray is not None:
        raise NotTekkenVocabulary(f"token {stray} ({tokens[stray]!r}) has type {types[stray]} after the control "
                                  f"tokens, where tekken has only normal tokens")
    return n_control


def _ranks(strings: Sequence[str], first_id: int) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from the normal tokens' strings (rank = position), checked to be a BPE table."""
    ends = list(accumulate(map(len, strings)))
    try:
        joined = strings_to_bytes("".join(strings))  # one byte per character: split at the strings' lengths
    except UnicodeEncodeError as exc:
        rank = bisect_right(ends, exc.start)
        raise NotTekkenVocabulary(f"token {first_id + rank} ({strings[rank]!r}) is not a GPT-2 byte-level "
                                  "string") from None
    pieces = map(joined.__getitem__, map(slice, [0, *ends[:-1]], ends))
    ranks = dict(zip(pieces, range(len(strings)), strict=True))
    if len(ranks) != len(strings):
        raise NotTekkenVocabulary("two normal tokens have the same bytes")
    if any(ranks.get(bytes([byte])) != byte for byte in range(256)):
        raise NotTekkenVocabulary("the first 256 normal tokens are not the single bytes in order")
    unmergeable = _first_unmergeable(ranks)
    if unmergeable is not None:
        raise NotTekkenVocabulary(f"token {first_id + ranks[unmergeable]} ({unmergeable!r}) is not the merge of "
                                  "two tokens of lower ids, so the ids are not BPE ranks")
    return ranks


def _first_unmergeable(ranks: dict[bytes, int]) -> bytes | None:
    """A token that BPE could not have built from two tokens made before it, if any (0.2 s for tekken's 130k)."""
    get = ranks.get
    for token, rank in ranks.items():
        if rank < 256:
            continue
        for cut in range(1, len(token)):
            if get(token[:cut], rank) < rank and get(token[cut:], rank) < rank:
                break
        else:
            return token
    return None
