"""Prompt text tokenized by pixtral_cpp.tekken_tokenizer equals mistral-common's tokens, with GGUFs whose
pre-tokenizer is `tekken` (pixtral-cpp's) or `pixtral` (llama.cpp's converter), where llama.cpp's own
tokenizer does not."""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import json
import logging
import random
import time
from pathlib import Path

import gguf
import pytest
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from PIL import Image as PILImage

from pixtral_cpp.backend import TextModel, TextModelOptions, llama_cpp_python
from pixtral_cpp.byte_tokens import token_bytes_of, token_string
from pixtral_cpp.convert.tokenizer import Vocabulary, load_tekken
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.synthetic import tekken as synthetic_tekken
from pixtral_cpp.synthetic.tekken import real_tekken_path
from pixtral_cpp.tekken_tokenizer import (
    PIXTRAL_CONTROL_IDS,
    TEKKEN_PATTERN,
    NotTekkenVocabulary,
    TekkenTokenizer,
    prompt_tokenizer,
)
from tests.gguf_helpers import read_gguf, rewrite_metadata
from tests.mistral_reference import IMG, IMG_BREAK, mistral_request
from tests.vocab_gguf import write_vocab_gguf

llama_cpp = llama_cpp_python()
PRES = ("tekken", "pixtral")  # pixtral-cpp's converter writes tekken; llama.cpp's writes pixtral (its LLAMA3 regex)
N_CONTROL = 1000  # tekken v3

CASES = {
    "names": ["O'Donnell", "O'Toole", "D'Angelo", "Mr. O'Donnell met D'Angelo and O'Toole.", "L'Oréal", "d'Artagnan",
              "McDonald's O’Brien", "Jean-Luc Picard"],
    "contractions": ["didn't", "we'll", "it's", "I'M", "I'm", "WE'LL", "they've", "she'd", "Don't you think it's",
                     "y'all", "rock 'n' roll", "'quoted'"],
    "numbers": ["1234567", "3.14159", "1,000,000", "-42", "+7", "0x7FFF", "1e-10", "12345678901234567890", "½ ⅓ ²"],
    "dates": ["2026-12-01", "12/01/2026", "01.12.2026", "2026-12-01T22:34:55Z", "Dec 1st, 2026", "22:34"],
    "code": ["def f(x):\n    if x:\n        return x * 2\n    return None\n",
             "\tindented\twith\ttabs\n\t\tand more",
             "line one\r\nline two\r\n\r\n",
             "for (int i = 0; i < n; ++i) { s += a[i]; }",
             "/* c */\n/* d */\n//x", "a=1;b=2;c=a**b//3%4", "x = {'k': [1, 2], \"v\": None}  # comment"],
    "whitespace": ["a  b   c    d", "   ", "\n", "\n\n\n", " \n \n", "\t\t", "end   \n", "  lead", "trail  ",
                   "nbsp\u00a0here", "ideographic\u3000space", "mixed \r\n \n\r", "\u2009thin\u200bzero"],
    "cjk": ["中文", "日本語", "한국어", "我能吞下玻璃而不伤身体。", "ひらがなとカタカナ", "다람쥐 헌 쳇바퀴에 타고파"],
    "indic": ["हिन्दी", "தமிழ்", "বাংলা", "ગુજરાતી", "नमस्ते दुनिया", "क्षत्रिय", "தமிழ்நாடு", "ਪੰਜਾਬੀ", "తెలుగు",
              "ಕನ್ನಡ", "മലയാളം", "සිංහල"],
    "rtl": ["العربية", "مَرْحَبًا بِالْعَالَم", "עברית", "שָׁלוֹם עוֹלָם", "123 العربية 456"],
    "thai": ["ภาษาไทย", "สวัสดีครับ", "กรุงเทพมหานคร"],
    "emoji": ["🍕", "I love 🍕 and 🎉!", "👨‍👩‍👧‍👦", "👩‍❤️‍👨", "🧑🏽‍💻", "👍🏻👍🏿", "1️⃣", "🇫🇷🇩🇪🇯🇵", "🏳️‍🌈",
              "🏴‍☠️", "🏴󠁧󠁢󠁥󠁮󠁧󠁿"],
    "combining": ["e\u0301", "cafe\u0301", "n\u0303o", "Z\u0351\u0337a\u0356\u0330l\u0334g\u0353o", "a\u20dd",
                  "\u0301leading mark", "ǅ ǈ ǋ titlecase"],
    "control_text": ["[INST]", "[/INST]", "<s>", "</s>", "[IMG]", "[IMG_BREAK][IMG_END]", "<unk>", "<SPECIAL_42>",
                     "<s>[INST] hi [/INST]</s>"],
    "odd": ["", "a\ud83dz", "\x00\x01\x7f", "\ufeffbom", "ﬁ ligature", "Ⅻ", "ℌ𝔢𝔩𝔩𝔬", "x" * 5000,
            "word " * 2000],
}

_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "éèêëàâäôöûüçñßøåÆŒĳ", "''’", "0123456789",
    ".,;:!?-_/()[]{}<>\"#$%&*+=@^`|~", " \n\r\t\u00a0\u3000", "中文日本語한국어漢字かなカナ",
    "हिन्दीकखगघािीुूेैोौं्ँः", "தமிழ்கசடதபறாிீுூெேைொோௌ்", "বাংলাকখগািীুূেৈোৌ্ং", "ગુજરાતીકખગાિીુૂેૈોૌ્ં",
    "العربيةمرحباًٌٍَُِّْ", "עבריתשלוםְֱֲֳִֵֶַָֹֻּ", "ภาษาไทยสวัสดีัิีึืุู่้๊๋็์", "\u0301\u0308\u0327\u0323\u20dd",
    "😀🍕🎉👍🏻🏿\u200d\ufe0f🇫🇷🇯🇵\u20e3",
]


def random_texts(count: int, seed: int) -> list[str]:
    """Mixed-script strings: runs drawn from several scripts, marks and emoji parts, plus the named cases."""
    rng = random.Random(seed)
    words = [text for group in ("names", "contractions", "numbers", "indic", "emoji") for text in CASES[group]]
    texts = []
    for _ in range(count):
        runs = [rng.choice(words) if rng.random() < 0.2 else
                "".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))
                for pool in rng.choices(_POOLS, k=rng.randint(1, 10))]
        texts.append("".join(runs))
    return texts


@pytest.fixture(scope="module")
def tekkenizer() -> Tekkenizer:
    return Tekkenizer.from_file(real_tekken_path())


@pytest.fixture(scope="module")
def real_vocab() -> Vocabulary:
    return load_tekken(real_tekken_path())


@pytest.fixture(scope="module")
def vocab_ggufs(real_vocab: Vocabulary, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real tekken vocabulary as a vocabulary-only GGUF with each pre-tokenizer name."""
    folder = tmp_path_factory.mktemp("vocab")
    return {pre: write_vocab_gguf(dataclasses.replace(real_vocab, pre=pre), folder / f"{pre}.gguf") for pre in PRES}


@pytest.fixture(scope="module")
def ours(vocab_ggufs: dict[str, Path]) -> dict[str, TekkenTokenizer]:
    return {pre: TekkenTokenizer.from_gguf(path) for pre, path in vocab_ggufs.items()}


@pytest.fixture(scope="module")
def llamas(vocab_ggufs: dict[str, Path]) -> dict[str, llama_cpp.Llama]:
    return {pre: llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            for pre, path in vocab_ggufs.items()}


def reference_ids(tekkenizer: Tekkenizer, text: str) -> list[int]:
    return tekkenizer.encode(text, bos=False, eos=False)


def mismatches(tokenizer: TekkenTokenizer, tekkenizer: Tekkenizer, texts: list[str]) -> list[str]:
    return [text for text in texts if tokenizer.encode(text) != reference_ids(tekkenizer, text)]


# ------------------------------------------------------------------------------------- the rule itself


def test_pattern_is_tekkens() -> None:
    config = json.loads(real_tekken_path().read_text(encoding="utf-8"))["config"]
    assert TEKKEN_PATTERN == config["pattern"] == synthetic_tekken.TEKKEN_PATTERN


def test_rank_is_id_minus_the_control_tokens_on_the_real_vocabulary(vocab_ggufs: dict[str, Path],
                                                                     tekkenizer: Tekkenizer) -> None:
    data = json.loads(real_tekken_path().read_text(encoding="utf-8"))
    header = read_gguf(vocab_ggufs["pixtral"])
    tokens, types = header.get(gguf.Keys.Tokenizer.LIST), header.get(gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert tekkenizer.num_special_tokens == N_CONTROL == types.index(int(gguf.TokenType.NORMAL))
    assert all(tokens[index] == name for name, index in PIXTRAL_CONTROL_IDS.items())
    ordinary = tokens[N_CONTROL:]
    assert len(ordinary) == data["config"]["default_vocab_size"] - N_CONTROL
    assert all(token_bytes_of(string) == base64.b64decode(entry["token_bytes"]) and entry["rank"] == rank
               for rank, (string, entry) in enumerate(zip(ordinary, data["vocab"], strict=False)))


def test_byte_table_round_trips_every_byte() -> None:
    every_byte = bytes(range(256))
    assert token_bytes_of(token_string(every_byte)) == every_byte
    assert len(token_string(every_byte)) == 256
    for outside in (" ", "\n", "\u0144", "€"):  # a space is stored as Ġ (U+0120); U+0144 is past the table
        with pytest.raises(KeyError):
            token_bytes_of("a" + outside)


# ------------------------------------------------------------------------------------- mistral-common's ids


@pytest.mark.parametrize("pre", PRES)
@pytest.mark.parametrize("group", CASES)
def test_same_ids_as_mistral_common(ours: dict[str, TekkenTokenizer], tekkenizer: Tekkenizer, pre: str,
                                    group: str) -> None:
    assert mismatches(ours[pre], tekkenizer, CASES[group]) == []


@pytest.mark.parametrize("pre", PRES)
def test_same_ids_on_random_mixed_scripts(ours: dict[str, TekkenTokenizer], tekkenizer: Tekkenizer, pre: str) -> None:
    texts = random_texts(1500, seed=11)
    assert len(set(texts)) > 1400
    assert mismatches(ours[pre], tekkenizer, texts) == []


def test_control_token_text_stays_plain_text(ours: dict[str, TekkenTokenizer], tekkenizer: Tekkenizer) -> None:
    for text in CASES["control_text"]:
        ids = ours["pixtral"].encode(text)
        assert ids and min(ids) >= N_CONTROL
        assert tekkenizer.decode(ids) == text


def test_llama_cpp_tokenizer_differs_where_tekken_matters(ours: dict[str, TekkenTokenizer], tekkenizer: Tekkenizer,
                                                          llamas: dict[str, llama_cpp.Llama]) -> None:
    """Why the prompt builder does not tokenize through llama.cpp (docs/runtime-notes.md §9)."""
    def llama_ids(pre: str, text: str) -> list[int]:
        return llamas[pre].tokenize(text.encode(), add_bos=False, special=False)

    for pre, text in (("pixtral", "O'Donnell"), ("pixtral", "O'Toole"), ("tekken", "हिन्दी"), ("tekken", "ಕನ್ನಡ"),
                      ("tekken", "สวัสดีครับ"), ("tekken", "مَرْحَبًا بِالْعَالَم")):
        expected = reference_ids(tekkenizer, text)
        assert ours[pre].encode(text) == expected
        assert llama_ids(pre, text) != expected, (pre, text)
    assert len(llama_ids("tekken", "हिन्दी")) > len(reference_ids(tekkenizer, "हिन्दी"))  # 4 tokens, not 3
    texts = random_texts(1500, seed=11)  # measured: llama.cpp differs on about a third of them with either pre
    for pre in PRES:
        assert sum(llama_ids(pre, text) != reference_ids(tekkenizer, text) for text in texts) > 300


def test_llama_cpp_renders_every_token_as_tekken_bytes_whatever_the_pre(llamas: dict[str, llama_cpp.Llama],
                                                                        tekkenizer: Tekkenizer) -> None:
    """Generated tokens are turned into text by llama_token_to_piece (backend/text.py token_piece): byte-level,
    so a `pixtral` file's answers read as mistral-common decodes them."""
    llama = llamas["pixtral"]
    buffer = ctypes.create_string_buffer(1024)
    vocab = llama._model.vocab

    def piece(token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    assert all(piece(token) == tekkenizer.id_to_byte_piece(token) for token in range(N_CONTROL, tekkenizer.n_words))
    assert all(piece(token) == b"" for token in range(N_CONTROL))  # control tokens add nothing to an answer
    text = "Mr. O'Donnell , didn't he ? हिन्दी 👨‍👩‍👧‍👦"
    assert b"".join(piece(t) for t in reference_ids(tekkenizer, text)).decode() == text


# ------------------------------------------------------------------------------------- eligibility


@pytest.fixture(scope="module")
def small_vocabulary(vocab_ggufs: dict[str, Path]) -> tuple[list[str], list[int]]:
    """The real vocabulary's first 3000 tokens: a tekken-shaped vocabulary (tiktoken ranks cut at any length)."""
    header = read_gguf(vocab_ggufs["tekken"])
    return header.get(gguf.Keys.Tokenizer.LIST)[:3000], header.get(gguf.Keys.Tokenizer.TOKEN_TYPE)[:3000]


def _swap(items: list, a: int, b: int) -> list:
    items = list(items)
    items[a], items[b] = items[b], items[a]
    return items


def test_a_cut_tekken_vocabulary_is_eligible(small_vocabulary: tuple[list[str], list[int]],
                                             tekkenizer: Tekkenizer) -> None:
    tokenizer = TekkenTokenizer.from_vocabulary("gpt2", *small_vocabulary)
    assert tokenizer.n_control == N_CONTROL
    ids = tokenizer.encode("hello world")
    assert all(token < 3000 for token in ids) and tekkenizer.decode(ids) == "hello world"


@pytest.mark.parametrize(("change", "reason"), [
    (lambda t, y: ("llama", t, y), "tokenizer model 'llama' is not gpt2"),
    (lambda t, y: ("gpt2", t, y[:-1]), "3000 tokens but 2999 token types"),
    (lambda t, y: ("gpt2", _swap(t, 3, 4), y), "control token [INST] is not at id 3 ('[/INST]' is)"),
    (lambda t, y: ("gpt2", t, [1] + y[1:]), "control token <unk> is not at id 0"),
    (lambda t, y: ("gpt2", t, y[:2000] + [4] + y[2001:]), "token 2000 ("),
    (lambda t, y: ("gpt2", t[:1000] + ["a b"] + t[1001:], y), "token 1000 ('a b') is not a GPT-2 byte-level string"),
    (lambda t, y: ("gpt2", t[:2001] + [t[2000]] + t[2002:], y), "two normal tokens have the same bytes"),
    (lambda t, y: ("gpt2", _swap(t, 1065, 1066), y), "the first 256 normal tokens are not the single bytes in order"),
    (lambda t, y: ("gpt2", _swap(t, 1256, 2999), y), "token 1256 ("),
    (lambda t, y: ("gpt2", t[:1200], y[:1200]), "only 200 tokens follow the 1000 control tokens"),
])
def test_ineligible_vocabularies_say_why(small_vocabulary: tuple[list[str], list[int]], change, reason: str) -> None:
    with pytest.raises(NotTekkenVocabulary) as caught:
        TekkenTokenizer.from_vocabulary(*change(*small_vocabulary))
    assert reason in str(caught.value)


def test_loading_the_real_vocabulary_is_fast(vocab_ggufs: dict[str, Path]) -> None:
    started = time.perf_counter()
    TekkenTokenizer.from_gguf(vocab_ggufs["pixtral"])
    assert time.perf_counter() - started < 5.0  # about 0.5 s here; a quadratic check would take minutes


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pixtral_pre_pair(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model's text GGUF as llama.cpp's converter names its pre-tokenizer, beside the same mmproj."""
    text, mmproj = pair
    folder = tmp_path_factory.mktemp("pre-pixtral")
    rewritten = rewrite_metadata(text, folder / text.name, gguf.Keys.Tokenizer.PRE, "pixtral")
    assert read_gguf(rewritten).get(gguf.Keys.Tokenizer.PRE) == "pixtral"
    return rewritten, mmproj


def test_a_pixtral_pre_file_gets_mistral_commons_prompt(pixtral_pre_pair: tuple[Path, Path],
                                                        tekkenizer: Tekkenizer) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    photo = PILImage.new("RGB", (48, 32), "teal")
    question = "Is this O'Donnell's car? I'M sure it isn't D'Angelo's. हिन्दी में बताइए 👨‍👩‍👧"
    conversation = [("system", "You're a helpful assistant."), ("user", [question, photo])]
    messages = [{"role": role, "content": content if isinstance(content, str) else
                 [{"type": "text", "text": question}, {"type": "image", "image": photo}]}
                for role, content in conversation]
    expected = MistralTokenizer.from_file(str(real_tekken_path())).encode_chat_completion(
        mistral_request(conversation)).tokens
    with PixtralModel.load(*pixtral_pre_pair, ModelOptions(n_ctx=1024, threads=2)) as model:
        model.prompt_logits(messages)
        evaluated = model._answerer.kv.keys  # what llama.cpp's KV cache holds: ids, and image keys per position
        llama_ids = model._text.tokenize(question, add_special=False)
        spaced = "Hello , world . It 's me ' ok"
        spaced_ids = reference_ids(tekkenizer, spaced)
        answer_text = b"".join(model._text.token_piece(token) for token in spaced_ids).decode()
        cleaned = model._text.detokenize(spaced_ids)
    # Answers are built from pieces (generate.py), which keep every byte; llama_detokenize would not: for pre
    # `pixtral` llama.cpp applies clean_up_tokenization_spaces, which tekken and mistral-common never do.
    assert answer_text == spaced == tekkenizer.decode(spaced_ids)
    assert cleaned == "Hello, world. It's me'ok"
    assert ["image" if isinstance(key, str) else key for key in evaluated] == \
        ["image" if token in (IMG, IMG_BREAK) else token for token in expected]
    assert llama_ids != reference_ids(tekkenizer, question)  # llama.cpp's Llama-3 split would not have been


def test_an_ineligible_vocabulary_falls_back_to_llama_cpp_with_a_warning(
        pair: tuple[Path, Path], tekkenizer: Tekkenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = pair[0]
    types = list(read_gguf(text).get(gguf.Keys.Tokenizer.TOKEN_TYPE))
    types[5000] = int(gguf.TokenType.USER_DEFINED)
    odd = rewrite_metadata(text, tmp_path / "odd.gguf", gguf.Keys.Tokenizer.TOKEN_TYPE, types)
    with TextModel(odd, TextModelOptions(n_ctx=256, n_threads=1)) as model, \
            caplog.at_level(logging.WARNING, logger="pixtral_cpp.tekken_tokenizer"):
        tokenize = prompt_tokenizer(model)
        hindi = "हिन्दी"
        assert tokenize(hindi) == model.tokenize(hindi, add_special=False) != reference_ids(tekkenizer, hindi)
    assert "token 5000" in caplog.text and "tokenized by llama.cpp" in caplog.text
