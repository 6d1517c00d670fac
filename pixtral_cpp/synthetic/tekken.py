"""Tokenizer files for tests: the real Pixtral tekken and a small, deterministic, offline stand-in.

`write_small_tekken` learns a byte-level BPE vocabulary from a built-in multilingual text, so it needs
neither the network nor mistral-common, and writes it in tekken v3's schema (the one Pixtral ships);
`write_tokenizer_json` re-expresses any tekken file as the tokenizer.json of a transformers checkpoint.
"""

from __future__ import annotations

import base64
import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

from pixtral_cpp.convert.tokenizer import TEKKEN_FILE, load_tekken
from pixtral_cpp.errors import TokenizerError

# Pixtral's pre-tokenizer regex, copied from the `config.pattern` of tekken_240911.json.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The same split in the stdlib's `re` (no \p classes), close enough to decide which tokens are worth learning.
_TRAINING_SPLIT = re.compile(r"[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

NUM_SPECIAL_TOKENS = 1000
DEFAULT_NUM_ORDINARY = 2840  # 256 bytes + 2584 learned: 3840 tokens in all, a multiple of 256
# Tokens learned beyond default_vocab_size, so loaders must cut the list as they do for the real file.
SURPLUS_TOKENS = 32

# Built-in training text: prose in several scripts, code, numbers and markup, so the small vocabulary has
# multi-byte UTF-8 tokens, digits, whitespace runs and punctuation clusters like the real one.
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and a model that
reads pictures must turn every one of them into tokens before it can say anything about them at all.
Describe this image in detail. What is in the picture? There is a red car parked next to a tall tree,
two people are walking along the street, and the sky is blue with a few white clouds in the distance.
Please answer briefly. The weather today is sunny, with temperatures between 18 and 24 degrees.
She said that the results were interesting, but the experiment would have to be repeated next year.
In 2024, the company released 3 new products; revenue grew by 12.5% to $4,200,000 (see Table 7).
Le renard brun rapide saute par-dessus le chien paresseux. Décrivez cette image en détail, s'il vous
plaît. Où est la gare ? C'est très intéressant : l'été dernier, nous sommes allés à la mer.
Der schnelle braune Fuchs springt über den faulen Hund. Beschreiben Sie dieses Bild ausführlich.
Größere Straßen führen durch die Stadt, und die Bäume blühen im Frühling wunderschön.
El rápido zorro marrón salta sobre el perro perezoso. ¿Qué hay en la imagen? ¡Qué día tan bonito!
Быстрая коричневая лиса прыгает через ленивую собаку. Опишите это изображение подробно, пожалуйста.
Что находится на картинке? Сегодня хорошая погода, и мы идём гулять в парк.
Швидка бура лисиця стрибає через ледачого пса. Zażółć gęślą jaźń, szybki brązowy lis skacze.
敏捷的棕色狐狸跳过了懒狗。请详细描述这张图片。图片里有什么？今天天气很好，我们去公园散步吧。
素早い茶色の狐がのろまな犬を飛び越える。この画像を詳しく説明してください。
빠른 갈색 여우가 게으른 개를 뛰어넘습니다. 이 이미지를 자세히 설명해 주세요.
def tokenize(text: str, add_bos: bool = True) -> list[int]:
    \"\"\"Split text into pieces and look every piece up in the vocabulary.\"\"\"
    tokens = [self.bos_id] if add_bos else []
    for piece in self.pattern.findall(text):
        tokens.extend(self.encode_piece(piece.encode("utf-8")))
    return tokens

class ImageEncoder:
    def __init__(self, patch_size: int = 16, max_image_size: int = 1024) -> None:
        self.patch_size = patch_size
        self.max_image_size = max_image_size

for (int i = 0; i < n; ++i) {
    if (tokens[i] == IMG_BREAK) { rows += 1; } else { cols = std::max(cols, i - start); }
}
function render(messages) { return messages.map((m) => `${m.role}: ${m.content}`).join("\\n"); }
SELECT id, name, created_at FROM users WHERE email LIKE '%@example.com' ORDER BY created_at DESC;
{"model": "pixtral-12b", "messages": [{"role": "user", "content": "Hello, world!"}], "max_tokens": 256}
<html><head><title>Example</title></head><body><p class="note">Hello &amp; welcome</p></body></html>
# Heading\n\n* item one\n* item two\n\n| column | value |\n|--------|-------|\n| width  | 1024  |
https://huggingface.co/mistral-community/pixtral-12b/resolve/main/tokenizer.json?download=true
user.name+tag@example.org 2024-09-11T12:34:56Z 192.168.0.1 0x7fff_ffff 3.14159 1e-5 -42 +7 100%
\t\tindented with tabs\r\n    and four spaces\r\n        and eight spaces\n\n\n
"""


def real_tekken_path() -> Path:
    """Path of Pixtral's tekken (mistral-common's data/tekken_240911.json)."""
    try:
        import mistral_common
    except ImportError:
        raise TokenizerError("the real Pixtral tokenizer ships with mistral-common: install the test extra "
                             "(pip install 'pixtral-cpp[test]') or mistral-common==1.13.1") from None
    path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing from the installed mistral-common; "
                             "reinstall mistral-common==1.13.1")
    return path


def write_small_tekken(path: Path | str, num_ordinary: int = DEFAULT_NUM_ORDINARY) -> Path:
    """Write a tekken v3 file of 1000 specials + `num_ordinary` byte-level tokens; returns its path.

    A folder path gets a `tekken.json` inside. The same arguments always give the same bytes.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TEKKEN_FILE
    tokens = learn_byte_level_bpe(_TRAINING_TEXT, num_ordinary + SURPLUS_TOKENS)
    document = {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "num_vocab_tokens": len(tokens),
            "default_vocab_size": NUM_SPECIAL_TOKENS + num_ordinary,
            "default_num_special_tokens": NUM_SPECIAL_TOKENS,
            "version": "v3",
        },
        "vocab": [_vocab_entry(rank, token) for rank, token in enumerate(tokens)],
        "image": {"image_patch_size": 16, "max_image_size": 1024},
    }
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _vocab_entry(rank: int, token: bytes) -> dict[str, Any]:
    try:
        display: str | None = token.decode("utf-8")
    except UnicodeDecodeError:
        display = None  # as in the real file: token_str is only a display string
    return {"rank": rank, "token_bytes": base64.b64encode(token).decode("ascii"), "token_str": display}


def learn_byte_level_bpe(text: str, vocab_size: int) -> list[bytes]:
    """The 256 single bytes, then tokens learned by merging the most frequent adjacent pair.

    Ties go to the smallest (left, right) byte strings, so the result is deterministic. Each learned
    token is the concatenation of two earlier ones, which tiktoken-style BPE relies on.
    """
    if vocab_size < 256:
        raise TokenizerError(f"a byte-level vocabulary needs at least 256 tokens, not {vocab_size}")
    pieces = Counter(piece.encode("utf-8") for piece in _training_pieces(text))
    learner = _PairMerger([[bytes([b]) for b in piece] for piece in pieces], list(pieces.values()))
    tokens = [bytes([b]) for b in range(256)]
    known = set(tokens)
    while len(tokens) < vocab_size:
        pair = learner.pop_most_frequent()
        if pair is None:
            raise TokenizerError(f"the built-in training text yields at most {len(tokens)} tokens; "
                                 f"asked for {vocab_size}")
        merged = pair[0] + pair[1]
        if merged not in known:  # two different pairs can spell the same bytes
            known.add(merged)
            tokens.append(merged)
        learner.merge(pair)
    return tokens


def _training_pieces(text: str) -> Iterable[str]:
    # Case variants, and words without their leading space, multiply the distinct pieces: a few
    # thousand learned tokens need them.
    for variant in (text, text.lower(), text.upper(), text.title()):
        yield from _TRAINING_SPLIT.findall(variant)
        yield from _TRAINING_SPLIT.findall(variant.replace(" ", "\n"))


Pair = tuple[bytes, bytes]


class _PairMerger:
    """Pair counts over weighted words, updated incrementally as pairs are merged."""

    def __init__(self, words: list[list[bytes]], weights: list[int]) -> None:
        self.words = words
        self.weights = weights
        self.counts: Counter[Pair] = Counter()
        self.where: dict[Pair, set[int]] = {}
        for index in range(len(words)):
            self._count(index, +1)
        self.heap = [(-count, *pair) for pair, count in self.counts.items()]
        heapq.heapify(self.heap)

    def _count(self, index: int, sign: int) -> None:
        word, weight = self.words[index], self.weights[index]
        for pair in pairwise(word):
            self.counts[pair] += sign * weight
            if sign > 0:
                self.where.setdefault(pair, set()).add(index)

    def pop_most_frequent(self) -> Pair | None:
        while self.heap:
            negative_count, left, right = heapq.heappop(self.heap)
            # Entries go stale when counts change; only one matching the live count is current.
            if self.counts.get((left, right), 0) == -negative_count > 0:
                return left, right
        return None

    def merge(self, pair: Pair) -> None:
        touched: set[Pair] = set()
        for index in sorted(self.where.pop(pair, ())):
            word = self.words[index]
            touched.update(pairwise(word))
            self._count(index, -1)
            self.words[index] = word = _merge_in_word(word, pair)
            self._count(index, +1)
            touched.update(pairwise(word))
        self.counts.pop(pair, None)
        for other in sorted(touched - {pair}):
            if self.counts.get(other, 0) > 0:
                heapq.heappush(self.heap, (-self.counts[other], *other))


def _merge_in_word(word: list[bytes], pair: Pair) -> list[bytes]:
    merged: list[bytes] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            merged.append(word[index] + word[index + 1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return merged


def write_tokenizer_json(tekken_path: Path | str, out_path: Path | str) -> Path:
    """Write a transformers tokenizer.json (byte-level BPE) with the vocabulary `load_tekken` gives."""
    tekken_path, out_path = Path(tekken_path), Path(out_path)
    if out_path.is_dir():
        out_path = out_path / "tokenizer.json"
    vocab = load_tekken(tekken_path)
    pattern = json.loads(tekken_path.read_text(encoding="utf-8"))["config"].get("pattern", TEKKEN_PATTERN)
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, vocab.tokens[i]) for i in sorted(vocab.special_ids.values())],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": _bos_post_processor(vocab.tokens[vocab.bos_id], vocab.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # tiktoken emits a pre-token that is itself a token without merging (llama.cpp's tekken too).
            "ignore_merges": True,
            "vocab": {token: index for index, token in enumerate(vocab.tokens)},
            "merges": [merge.split(" ", 1) for merge in vocab.merges],
        },
    }
    out_path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return out_path


def _added_token(index: int, content: str) -> dict[str, Any]:
    return {"id": index, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """Prepend `<s>` like mistral-community/pixtral-12b's tokenizer.json does."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
