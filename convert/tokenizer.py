"""Pixtral's tokenizer (tekken.json or tokenizer.json) as a GGUF byte-level BPE vocabulary.

Both files become the same `Vocabulary`: ids 0..999 are control tokens stored as literal text, every other
token is its bytes mapped through GPT-2's byte→unicode table, and the merge list is derived so that
llama.cpp's BPE (model `gpt2`, pre-tokenizer `tekken`) reproduces tiktoken's rank-ordered merging.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf

from pixtral_cpp.byte_tokens import token_bytes_of, token_string  # noqa: F401 - tests import token_bytes_of here
from pixtral_cpp.convert.json_files import MAX_TOKENIZER_BYTES, brief, read_json_object
from pixtral_cpp.errors import TokenizerError

TEKKEN_FILE = "tekken.json"
TOKENIZER_JSON_FILE = "tokenizer.json"
# llama.cpp's name for the tekken pre-tokenizer regex (not `pixtral`, which selects the LLAMA3 regex).
TEKKEN_PRE_TOKENIZER = "tekken"
GGUF_TOKENIZER_MODEL = "gpt2"

# mistral-common's built-in specials (Tekkenizer.DEPRECATED_SPECIAL_TOKENS) for files without a
# `special_tokens` list, such as Pixtral's v3 tekken; ids 20..999 are filled with `<SPECIAL_{id}>`.
LEGACY_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
SPECIAL_FILLER_TEMPLATE = "<SPECIAL_{id}>"
# Pixtral has 131,072 tokens and the largest published vocabularies about 260k; beyond this, a count is corrupt
# (and building that many filler specials or GGUF strings would exhaust memory first).
MAX_VOCAB_SIZE = 1 << 22
# tiktoken's longest tokens are tens of bytes; deriving merges costs the square of a token's length.
MAX_TOKEN_BYTES = 1024

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN = "<s>", "</s>", "<unk>", "<pad>"
IMG_TOKEN, IMG_BREAK_TOKEN, IMG_END_TOKEN = "[IMG]", "[IMG_BREAK]", "[IMG_END]"


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids of the tokens that lay out an image: `[IMG]` patches, `[IMG_BREAK]` rows, `[IMG_END]`."""

    img: int
    img_break: int
    img_end: int


@dataclass(frozen=True)
class Vocabulary:
    """A GGUF-ready BPE vocabulary: token strings, types and merges, plus the ids llama.cpp needs."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    special_ids: dict[str, int]
    pre: str = TEKKEN_PRE_TOKENIZER
    # Where the vocabulary came from, for error messages; two routes to the same vocabulary compare equal.
    source: str = field(default="", compare=False)

    @cached_property
    def _ids_by_token(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}

    def id_of(self, token: str) -> int:
        """The id of a token given as its GGUF string (specials as text, e.g. `[IMG]`)."""
        try:
            return self._ids_by_token[token]
        except KeyError:
            where = self.source or "this tokenizer"
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {where}; "
                                 "is this a Pixtral tokenizer?") from None

    @property
    def image_token_ids(self) -> ImageTokenIds:
        """The image layout token ids, looked up by name."""
        return ImageTokenIds(self.id_of(IMG_TOKEN), self.id_of(IMG_BREAK_TOKEN), self.id_of(IMG_END_TOKEN))


# ----------------------------------------------------------------------------------------- tekken.json


def load_tekken(path: Path | str) -> Vocabulary:
    """Build the GGUF vocabulary from a Mistral tekken.json (docs/gguf-layout.md §5)."""
    path = Path(path)
    data = _read_json(path)
    config = _require(data, "config", dict, path)
    vocab_size = _require(config, "default_vocab_size", int, path, "config.default_vocab_size")
    num_special = _require(config, "default_num_special_tokens", int, path,
                           "config.default_num_special_tokens")
    entries = _require(data, "vocab", list, path)
    _check_vocabulary_size(vocab_size, path, "config.default_vocab_size")
    if not 0 <= num_special <= vocab_size:
        raise TokenizerError(f"{path}: config.default_num_special_tokens {num_special} must be between 0 and "
                             f"config.default_vocab_size ({vocab_size})")
    num_ordinary = vocab_size - num_special
    if num_ordinary < 256 or len(entries) < num_ordinary:
        raise TokenizerError(f"{path}: config.default_vocab_size {vocab_size} with {num_special} special "
                             f"tokens needs {num_ordinary} (at least 256) vocab entries, the file has "
                             f"{len(entries)}")
    specials = _tekken_special_tokens(data, num_special, path)
    ordinary = _tekken_ordinary_bytes(entries[:num_ordinary], path)
    ordinary_strings = [token_string(token) for token in ordinary]
    return _assemble(
        specials=specials,
        ordinary=ordinary_strings,
        merges=list(_tekken_merges(ordinary, ordinary_strings)),
        source=str(path),
    )


def _tekken_special_tokens(data: Mapping[str, Any], num_special: int, path: Path) -> list[str]:
    listed = data.get("special_tokens")
    named = list(LEGACY_SPECIAL_TOKENS) if listed is None else _listed_special_tokens(listed, path)
    if len(named) > num_special:
        raise TokenizerError(f"{path}: {len(named)} special tokens but config.default_num_special_tokens is "
                             f"{num_special}")
    named += [SPECIAL_FILLER_TEMPLATE.format(id=index) for index in range(len(named), num_special)]
    if len(set(named)) != len(named):
        raise TokenizerError(f"{path}: the special tokens are not unique")
    return named


def _listed_special_tokens(listed: Any, path: Path) -> list[str]:
    if not isinstance(listed, list):
        raise TokenizerError(f"{path}: key 'special_tokens' must be a list")
    by_rank: dict[int, str] = {}
    for entry in listed:
        rank = _require(entry, "rank", int, path, "special_tokens[].rank")
        by_rank[rank] = _require(entry, "token_str", str, path, "special_tokens[].token_str")
    if sorted(by_rank) != list(range(len(listed))):
        raise TokenizerError(f"{path}: special_tokens ranks must be 0..{len(listed) - 1} "
                             "without gaps or repeats")
    return [by_rank[rank] for rank in range(len(listed))]


def _tekken_ordinary_bytes(entries: Sequence[Any], path: Path) -> list[bytes]:
    ordinary: list[bytes] = []
    for index, entry in enumerate(entries):
        rank = _require(entry, "rank", int, path, f"vocab[{index}].rank")
        encoded = _require(entry, "token_bytes", str, path, f"vocab[{index}].token_bytes")
        if rank != index:
            raise TokenizerError(f"{path}: vocab[{index}] has rank {rank}; ranks must count up from 0")
        try:
            token = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise TokenizerError(f"{path}: vocab[{index}].token_bytes is not valid base64") from None
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenizerError(f"{path}: vocab[{index}].token_bytes is {len(token)} bytes long; tokens of "
                                 f"more than {MAX_TOKEN_BYTES} bytes mean a corrupt file")
        # tiktoken's layout: ranks 0..255 are the single bytes in byte order, the rest are longer.
        if (index < 256 and token != bytes([index])) or (index >= 256 and len(token) < 2):
            expected = f"the single byte {index}" if index < 256 else "at least two bytes"
            raise TokenizerError(f"{path}: vocab[{index}].token_bytes must be {expected}")
        ordinary.append(token)
    if len(set(ordinary)) != len(ordinary):
        raise TokenizerError(f"{path}: the vocab holds the same token bytes twice")
    return ordinary


def _tekken_merges(ordinary: Sequence[bytes], strings: Sequence[str]) -> Iterable[str]:
    """Merges by the split rule (docs/gguf-layout.md §5.3): every in-table split of each token, in rank order.

    A merge's position is its priority in llama.cpp, so listing the splits of rank i before those of rank
    i + 1 makes llama.cpp merge in tiktoken's order (lowest rank of the merged token first).
    """
    rank_of = {token: rank for rank, token in enumerate(ordinary)}
    for token in ordinary[256:]:
        splits = sorted(
            (rank_of[token[:cut]], rank_of[token[cut:]])
            for cut in range(1, len(token))
            if token[:cut] in rank_of and token[cut:] in rank_of
        )
        for left, right in splits:
            yield f"{strings[left]} {strings[right]}"


# -------------------------------------------------------------------------------------- tokenizer.json


def load_tokenizer_json(path: Path | str) -> Vocabulary:
    """Build the GGUF vocabulary from a Hugging Face byte-level BPE tokenizer.json."""
    path = Path(path)
    data = _read_json(path)
    model = _require(data, "model", dict, path)
    model_type = model.get("type", "BPE")
    if model_type != "BPE":
        raise TokenizerError(f"{path}: model.type is {brief(model_type)}; "
                             "only byte-level BPE tokenizers are supported")
    vocab = _require(model, "vocab", dict, path, "model.vocab")
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise TokenizerError(f"{path}: key 'added_tokens' must be a list")
    tokens, control = _tokenizer_json_tokens(vocab, added, path)
    merges = [_merge_string(merge, path) for merge in _require(model, "merges", list, path, "model.merges")]
    types = [int(gguf.TokenType.CONTROL if index in control else gguf.TokenType.NORMAL)
             for index in range(len(tokens))]
    return _vocabulary(tokens, types, merges, str(path))


def _tokenizer_json_tokens(
    vocab: Mapping[str, Any], added: Sequence[Any], path: Path
) -> tuple[list[str], set[int]]:
    """Token strings by id, and the ids of special added tokens."""
    _check_vocabulary_size(len(vocab) + len(added), path, "model.vocab with added_tokens")
    by_id: dict[int, str] = {}
    for token, index in vocab.items():
        if not isinstance(index, int) or isinstance(index, bool) or index in by_id:
            raise TokenizerError(f"{path}: model.vocab[{brief(token)}] must be a unique integer id, "
                                 f"got {brief(index)}")
        by_id[index] = token
    control: set[int] = set()
    for entry in added:
        index = _require(entry, "id", int, path, "added_tokens[].id")
        content = _require(entry, "content", str, path, "added_tokens[].content")
        if by_id.setdefault(index, content) != content:
            raise TokenizerError(f"{path}: added token {brief(content)} has id {index}, "
                                 f"which model.vocab gives to {brief(by_id[index])}")
        if entry.get("special", False):
            control.add(index)
    if sorted(by_id) != list(range(len(by_id))):
        raise TokenizerError(f"{path}: token ids must be 0..{len(by_id) - 1} without gaps")
    return [by_id[index] for index in range(len(by_id))], control


def _merge_string(merge: Any, path: Path) -> str:
    # Older tokenizer.json files store "a b", newer ones ["a", "b"]; GGUF wants "a b".
    if isinstance(merge, str) and " " in merge[1:]:
        return merge
    if isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
        return f"{merge[0]} {merge[1]}"
    raise TokenizerError(f"{path}: model.merges entry {brief(merge)} is neither 'a b' nor ['a', 'b']")


# ------------------------------------------------------------------------------------------ shared


def _assemble(specials: list[str], ordinary: list[str], merges: list[str], source: str) -> Vocabulary:
    types = [int(gguf.TokenType.CONTROL)] * len(specials) + [int(gguf.TokenType.NORMAL)] * len(ordinary)
    return _vocabulary(specials + ordinary, types, merges, source)


def _vocabulary(tokens: list[str], types: list[int], merges: list[str], source: str) -> Vocabulary:
    if len(set(tokens)) != len(tokens):
        # llama.cpp refuses a vocabulary with repeated token strings.
        raise TokenizerError(f"{source}: the vocabulary holds the same token string twice")
    special_ids = {token: index for index, token in enumerate(tokens)
                   if types[index] == gguf.TokenType.CONTROL}

    def required(name: str) -> int:
        if name not in special_ids:
            raise TokenizerError(f"{source}: special token {name!r} is missing; is this a Mistral tokenizer?")
        return special_ids[name]

    return Vocabulary(
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=required(BOS_TOKEN),
        eos_id=required(EOS_TOKEN),
        unk_id=required(UNK_TOKEN),
        pad_id=required(PAD_TOKEN),
        special_ids=special_ids,
        source=source,
    )


def _read_json(path: Path) -> dict[str, Any]:
    # Repeated keys are harmless here: a repeated vocab entry leaves a gap in the ids, which is refused.
    return read_json_object(path, TokenizerError, max_bytes=MAX_TOKENIZER_BYTES, unique_keys=False)


def _check_vocabulary_size(size: int, path: Path, what: str) -> None:
    if size > MAX_VOCAB_SIZE:
        raise TokenizerError(f"{path}: {what} is {size} tokens; more than {MAX_VOCAB_SIZE} is not a real "
                             "vocabulary (corrupt file?)")


def _require(mapping: Any, key: str, kind: type, path: Path, name: str | None = None) -> Any:
    """`mapping[key]` checked for type, or a TokenizerError naming the file and the key."""
    name = name or key
    if not isinstance(mapping, dict) or key not in mapping:
        raise TokenizerError(f"{path}: key '{name}' is missing")
    value = mapping[key]
    # bool is an int subclass; a boolean rank or id is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TokenizerError(f"{path}: key '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def load_vocabulary(folder: Path | str) -> Vocabulary:
    """The vocabulary of a checkpoint folder: tekken.json if present, else tokenizer.json."""
    folder = Path(folder)
    tekken = folder / TEKKEN_FILE
    if tekken.is_file():
        return load_tekken(tekken)
    tokenizer_json = folder / TOKENIZER_JSON_FILE
    if tokenizer_json.is_file():
        return load_tokenizer_json(tokenizer_json)
    raise TokenizerError(f"no tokenizer in {folder}: looked for {TEKKEN_FILE} (Mistral format) and "
                         f"{TOKENIZER_JSON_FILE} (transformers format)")


def add_vocabulary_metadata(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    """Write the tokenizer.ggml.* keys of the text GGUF (docs/gguf-layout.md §4.1)."""
    writer.add_tokenizer_model(GGUF_TOKENIZER_MODEL)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    # mtmd adds BOS itself when add_bos is true; the chat template therefore never emits `<s>`.
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
