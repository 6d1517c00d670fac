"""The GGUF vocabulary built from tekken.json / tokenizer.json tokenizes exactly like mistral-common."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import gguf
import pytest
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from pixtral_cpp.backend import llama_cpp_python
from pixtral_cpp.convert.tokenizer import (
    Vocabulary,
    load_tekken,
    load_tokenizer_json,
    load_vocabulary,
    token_bytes_of,
)
from pixtral_cpp.errors import TokenizerError
from pixtral_cpp.synthetic.tekken import (
    DEFAULT_NUM_ORDINARY,
    real_tekken_path,
    write_small_tekken,
    write_tokenizer_json,
)
from tests.vocab_gguf import write_vocab_gguf

llama_cpp = llama_cpp_python()  # llama-cpp-python's own tokenizer is the reference here

# Devanagari (and other scripts built on combining marks) is left out on purpose: llama.cpp's tekken
# regex splits combining marks differently from tiktoken (docs/runtime-notes.md §5: `हिन्दी` is 3 tokens in
# llama.cpp, 1 in mistral-common). Everything below matched token for token.
CORPUS = [
    # prose
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "It's a dog's life; isn't it? \"Quoted\" text — with dashes… and ellipses.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Où êtes-vous ? Ça va !",
    "Der schnelle braune Fuchs springt über den faulen Hund. Größenordnung, Straße, Äpfel.",
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Qué tal? ¡Olé!",
    "Zażółć gęślą jaźń. Chrząszcz brzmi w trzcinie w Szczebrzeszynie.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів!",
    "我能吞下玻璃而不伤身体。今天天气很好，我们去公园散步吧！",
    "いろはにほへと　ちりぬるを。私はガラスを食べられます。それは私を傷つけません。",
    "다람쥐 헌 쳇바퀴에 타고파. 나는 유리를 먹을 수 있어요.",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "MixedCASE wORDS and ALLCAPS and camelCaseIdentifiers and snake_case_names",
    "Ünïcödé lëttérs with àccents: naïve café façade coöperate",
    # code
    "def main(argv: list[str]) -> int:\n    return len(argv) + 1\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{:?}\", v); }",
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    "<div class=\"row\"><a href=\"https://example.com/?q=1&amp;r=2\">link</a></div>",
    "if [ -f ~/.bashrc ]; then source ~/.bashrc; fi && echo $PATH | tr ':' '\\n'",
    "\tindented\twith\ttabs\n\t\tand more tabs",
    "x=1;y=2;z=x**y//3%4",
    # tekken's regex keeps "/" with a preceding line break (`[\r\n/]*`); the LLAMA3 regex that pre
    # `pixtral` selects does not, so these catch a wrong tokenizer.ggml.pre
    "/* comment */\n/* another */",
    "http://example.com/\n/path",
    "end;\n/next",
    # numbers, dates, identifiers
    "3.14159265358979 2.71828 1e-10 -42 +7 0x7FFF 0b1010 1_000_000",
    "1234567890 12 345 6789 000 007",
    "2024-09-11T12:34:56Z, 11/09/2024, 11.09.2024, Sep 11th 2024",
    "Prices: $4.99, €12,50, £7, ¥1000, ₹250 and 15% off",
    "https://huggingface.co/mistral-community/pixtral-12b/resolve/main/config.json?download=true#top",
    "Contact: first.last+tag@example.co.uk or admin@localhost",
    "192.168.0.1:8080 and [::1]:443",
    "ISBN 978-3-16-148410-0, phone +33 1 23 45 67 89",
    # whitespace and line breaks
    "a  b   c    d",
    "line one\nline two\n\nline four\n\n\n",
    "windows\r\nline\r\nendings\r\n",
    "mixed \r\n \n\r spaces",
    "non\u00a0breaking\u00a0space and thin\u2009space",
    "trailing newline\n",
    "   ",
    "\n",
    # emoji
    "I love 🍕 and 🎉!",
    "Family: 👨‍👩‍👧‍👦, couple: 👩‍❤️‍👨, technologist: 🧑🏽‍💻",
    "Flags: 🇫🇷 🇩🇪 🇯🇵 🇺🇦 🏳️‍🌈",
    "Skin tones: 👍🏻 👍🏿 and keycap 1️⃣",
    # markup and data
    "# Title\n\n## Subtitle\n\n* item one\n* item two\n\n**bold** _italic_ `code`",
    "| col | val |\n|-----|-----|\n| a   | 1   |",
    "```python\nprint('hi')\n```",
    "{\"model\": \"pixtral-12b\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"n\": 1}",
    "<s>[INST] looks special but is plain text here [/INST]</s>",
    "[IMG][IMG_BREAK][IMG_END] as text",
    "Math: ∑_{i=1}^{n} x_i² ≤ √(n·∑x_i⁴), α β γ ∞ ≠ ≈",
]


@pytest.fixture(scope="module")
def real_path() -> Path:
    return real_tekken_path()


@pytest.fixture(scope="module")
def real_vocab(real_path: Path) -> Vocabulary:
    return load_tekken(real_path)


@pytest.fixture(scope="module")
def tekkenizer(real_path: Path) -> Tekkenizer:
    return Tekkenizer.from_file(real_path)


@pytest.fixture(scope="module")
def real_vocab_from_json(real_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Vocabulary:
    folder = tmp_path_factory.mktemp("hf")
    return load_tokenizer_json(write_tokenizer_json(real_path, folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def small_tekken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_tekken(tmp_path_factory.mktemp("small") / "tekken.json")


def open_vocab_only(vocab: Vocabulary, path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(write_vocab_gguf(vocab, path)), vocab_only=True, verbose=False)


def assert_tokenizes_like(llama: llama_cpp.Llama, reference: Tekkenizer, texts: list[str]) -> None:
    """Same ids as mistral-common for every text, and llama.cpp's detokenization gives the text back."""
    mismatches = []
    for text in texts:
        ours = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        expected = reference.encode(text, bos=False, eos=False)
        if ours != expected:
            mismatches.append((text, ours, expected))
        assert llama.detokenize(ours).decode("utf-8") == text
    assert mismatches == []


# ------------------------------------------------------------------------------------- real tekken


def test_real_tekken_has_pixtral_layout(real_vocab: Vocabulary) -> None:
    assert len(real_vocab.tokens) == 131072
    assert len(set(real_vocab.tokens)) == len(real_vocab.tokens)
    assert len(real_vocab.merges) == 269443
    assert real_vocab.merges[:6] == ["Ġ Ġ", "Ġ t", "e r", "i n", "Ġ ĠĠĠ", "ĠĠ ĠĠ"]
    assert real_vocab.merges[-1] == "åĲİ æ±īä¹¦"
    assert (real_vocab.unk_id, real_vocab.bos_id, real_vocab.eos_id, real_vocab.pad_id) == (0, 1, 2, 11)
    ids = real_vocab.image_token_ids
    assert (ids.img, ids.img_break, ids.img_end) == (10, 12, 13)
    assert real_vocab.id_of("[INST]") == 3 and real_vocab.id_of("[/INST]") == 4
    assert real_vocab.special_ids["[IMG_BREAK]"] == 12 and real_vocab.special_ids["<SPECIAL_999>"] == 999
    assert real_vocab.id_of("Ċ") == 1010  # "\n" is byte 10, after the 1000 specials
    assert real_vocab.token_types == [gguf.TokenType.CONTROL] * 1000 + [gguf.TokenType.NORMAL] * 130072
    assert real_vocab.pre == "tekken"


def test_every_merge_joins_two_tokens_into_a_third(real_vocab: Vocabulary) -> None:
    known = set(real_vocab.tokens[1000:])
    for merge in real_vocab.merges[::97]:
        left, right = merge.split(" ")
        assert left in known and right in known and left + right in known


def test_tokenizer_json_route_gives_the_same_vocabulary(real_vocab: Vocabulary,
                                                        real_vocab_from_json: Vocabulary) -> None:
    assert real_vocab_from_json == real_vocab
    assert real_vocab_from_json.source.endswith("tokenizer.json")


@pytest.fixture(scope="module")
def llama_from_tekken(real_vocab: Vocabulary, tmp_path_factory: pytest.TempPathFactory) -> llama_cpp.Llama:
    return open_vocab_only(real_vocab, tmp_path_factory.mktemp("gguf") / "tekken-vocab.gguf")


def test_llama_cpp_tokenizes_like_mistral_common(llama_from_tekken: llama_cpp.Llama,
                                                 tekkenizer: Tekkenizer) -> None:
    assert len(CORPUS) >= 50
    assert_tokenizes_like(llama_from_tekken, tekkenizer, CORPUS)


def test_tokenizer_json_route_tokenizes_like_mistral_common(real_vocab_from_json: Vocabulary,
                                                            tekkenizer: Tekkenizer, tmp_path: Path) -> None:
    llama = open_vocab_only(real_vocab_from_json, tmp_path / "json-vocab.gguf")
    assert_tokenizes_like(llama, tekkenizer, CORPUS)


def test_corpus_tells_tekken_from_the_pixtral_pre_tokenizer(real_vocab: Vocabulary, tekkenizer: Tekkenizer,
                                                            tmp_path: Path) -> None:
    # What llama.cpp's converter picks for a transformers tokenizer.json (docs/gguf-layout.md §6): LLAMA3's regex.
    llama = open_vocab_only(dataclasses.replace(real_vocab, pre="pixtral"), tmp_path / "pixtral-pre.gguf")
    differing = [text for text in CORPUS if llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                 != tekkenizer.encode(text, bos=False, eos=False)]
    assert len(differing) >= 3


def test_special_tokens_are_parsed_only_when_asked(llama_from_tekken: llama_cpp.Llama,
                                                   tekkenizer: Tekkenizer) -> None:
    prompt = b"[INST]Describe[/INST]"
    parsed = llama_from_tekken.tokenize(prompt, add_bos=True, special=True)
    assert parsed == [1, 3, *tekkenizer.encode("Describe", bos=False, eos=False), 4]
    assert llama_from_tekken.tokenize(prompt, add_bos=False, special=False) == tekkenizer.encode(
        prompt.decode(), bos=False, eos=False)
    assert llama_from_tekken.token_bos() == 1 and llama_from_tekken.token_eos() == 2


def test_gguf_metadata_has_llama_cpp_types(small_tekken: Path, tmp_path: Path) -> None:
    # The small vocabulary keeps GGUFReader fast; the real one goes through the same writer calls.
    vocab = load_tekken(small_tekken)
    fields = gguf.GGUFReader(write_vocab_gguf(vocab, tmp_path / "vocab.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "tekken"
    ids = [("bos_token_id", 1), ("eos_token_id", 2), ("unknown_token_id", 0), ("padding_token_id", 11)]
    for key, value in ids:
        assert fields[f"tokenizer.ggml.{key}"].types == [gguf.GGUFValueType.UINT32]
        assert fields[f"tokenizer.ggml.{key}"].contents() == value
    assert fields["tokenizer.ggml.add_bos_token"].types == [gguf.GGUFValueType.BOOL]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False
    assert fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert fields["tokenizer.ggml.token_type"].contents() == vocab.token_types
    assert fields["tokenizer.ggml.tokens"].contents() == vocab.tokens
    assert fields["tokenizer.ggml.merges"].contents() == vocab.merges


def test_llama_cpp_sees_the_whole_real_vocabulary(llama_from_tekken: llama_cpp.Llama) -> None:
    assert llama_from_tekken.n_vocab() == 131072
    assert llama_from_tekken.metadata["tokenizer.ggml.pre"] == "tekken"


# ------------------------------------------------------------------------------------ small tekken


def test_small_tekken_is_deterministic_and_cut_like_the_real_one(small_tekken: Path, tmp_path: Path) -> None:
    assert write_small_tekken(tmp_path).read_bytes() == small_tekken.read_bytes()  # folder → tekken.json
    document = json.loads(small_tekken.read_text(encoding="utf-8"))
    config = document["config"]
    assert config["default_num_special_tokens"] == 1000 and config["version"] == "v3"
    assert config["default_vocab_size"] == 1000 + DEFAULT_NUM_ORDINARY
    assert config["num_vocab_tokens"] == len(document["vocab"]) > DEFAULT_NUM_ORDINARY
    vocab = load_tekken(small_tekken)
    assert len(vocab.tokens) == 1000 + DEFAULT_NUM_ORDINARY
    assert (vocab.bos_id, vocab.eos_id, vocab.image_token_ids.img_break) == (1, 2, 12)


def test_small_tekken_tokens_are_reachable_by_merges(small_tekken: Path) -> None:
    vocab = load_tekken(small_tekken)
    ordinary = [token_bytes_of(token) for token in vocab.tokens[1000:]]
    assert ordinary[:256] == [bytes([byte]) for byte in range(256)]
    assert len(set(ordinary)) == len(ordinary)
    known: set[bytes] = set(ordinary[:256])
    for token in ordinary[256:]:
        # tiktoken builds a token only from two tokens that exist before it
        assert any(token[:cut] in known and token[cut:] in known for cut in range(1, len(token))), token
        known.add(token)
    assert len(vocab.merges) >= len(ordinary) - 256


def test_small_tekken_tokenizes_like_mistral_common(small_tekken: Path, tmp_path: Path) -> None:
    reference = Tekkenizer.from_file(small_tekken)
    vocab = load_tekken(small_tekken)
    assert reference.n_words == len(vocab.tokens)
    assert_tokenizes_like(open_vocab_only(vocab, tmp_path / "small.gguf"), reference, CORPUS)
    from_json = load_tokenizer_json(write_tokenizer_json(small_tekken, tmp_path))
    assert from_json == vocab
    assert_tokenizes_like(open_vocab_only(from_json, tmp_path / "small-json.gguf"), reference, CORPUS)


def test_special_tokens_list_is_honoured(small_tekken: Path, tmp_path: Path) -> None:
    document = json.loads(small_tekken.read_text(encoding="utf-8"))
    names = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[NEW]", "[IMG]", "<pad>", "[IMG_BREAK]",
             "[IMG_END]"]
    document["special_tokens"] = [{"rank": rank, "token_str": name, "is_control": True}
                                  for rank, name in enumerate(names)]
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    vocab = load_tekken(path)
    assert vocab.tokens[:10] == names and vocab.tokens[10] == "<SPECIAL_10>"
    assert (vocab.pad_id, vocab.image_token_ids.img, vocab.image_token_ids.img_end) == (7, 6, 9)
    assert Tekkenizer.from_file(path).get_special_token("[IMG_END]") == 9


# ---------------------------------------------------------------------------------------- folders


def test_load_vocabulary_prefers_tekken_json(small_tekken: Path, tmp_path: Path) -> None:
    write_small_tekken(tmp_path)
    write_tokenizer_json(small_tekken, tmp_path)
    assert load_vocabulary(tmp_path).source.endswith("tekken.json")
    (tmp_path / "tekken.json").unlink()
    vocab = load_vocabulary(tmp_path)
    assert vocab.source.endswith("tokenizer.json") and vocab == load_tekken(small_tekken)


# -------------------------------------------------------------------------------------- bad input


def test_missing_tokenizer_names_both_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tekken\.json") as error:
        load_vocabulary(tmp_path)
    assert "tokenizer.json" in str(error.value) and str(tmp_path) in str(error.value)


def test_truncated_json_is_reported_with_its_path(small_tekken: Path, tmp_path: Path) -> None:
    broken = tmp_path / "tekken.json"
    broken.write_bytes(small_tekken.read_bytes()[:5000])
    with pytest.raises(TokenizerError, match="not valid JSON") as error:
        load_vocabulary(tmp_path)
    assert str(broken) in str(error.value)


@pytest.mark.parametrize(("drop", "key"), [
    ("default_vocab_size", "config.default_vocab_size"),
    ("default_num_special_tokens", "config.default_num_special_tokens"),
])
def test_missing_tekken_key_is_named(small_tekken: Path, tmp_path: Path, drop: str, key: str) -> None:
    document = json.loads(small_tekken.read_text(encoding="utf-8"))
    del document["config"][drop]
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(f"{path}: key '{key}' is missing")):
        load_tekken(path)


def test_bad_token_bytes_are_reported(small_tekken: Path, tmp_path: Path) -> None:
    document = json.loads(small_tekken.read_text(encoding="utf-8"))
    document["vocab"][300]["token_bytes"] = base64.b64encode(b"x").decode()  # a single byte past rank 255
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab\[300\]\.token_bytes must be at least two bytes"):
        load_tekken(path)


def test_tokenizer_json_without_vocab_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "BPE", "merges": []}}), encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(f"{path}: key 'model.vocab' is missing")):
        load_vocabulary(tmp_path)


def test_unknown_token_names_token_and_file(small_tekken: Path) -> None:
    vocab = load_tekken(small_tekken)
    with pytest.raises(TokenizerError, match=r"'\[NOT_A_TOKEN\]' is not in the vocabulary of .*tekken\.json"):
        vocab.id_of("[NOT_A_TOKEN]")


def test_small_tekken_refuses_more_tokens_than_its_text_teaches(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="yields at most"):
        write_small_tekken(tmp_path, num_ordinary=100_000)
