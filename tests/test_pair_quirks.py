"""Pairs with the quirks of llama.cpp's own converter (tests/quirky_files.py): each quirk detected, shown by
`info`, and either corrected exactly at load time or refused with its reason before llama.cpp sees it."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from pixtral_cpp.cli import main
from pixtral_cpp.conversation import Image, Message, Text
from pixtral_cpp.errors import ModelError
from pixtral_cpp.fix_pair import img_break_vector
from pixtral_cpp.gguf_file import read_gguf_header
from pixtral_cpp.gguf_keys import IMG_BREAK_TENSOR
from pixtral_cpp.images import prepare_image
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.model_files import ModelFiles, check_pair, inspect_pair
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.pair_quirks import LLAMA_CPP_WRITER, PIXTRAL_CPP_WRITER, Handling
from tests.quirky_files import (
    KEEP,
    LLAMA_CPP_HF,
    LLAMA_CPP_NATIVE,
    OLD_LLAMA_CPP,
    Quirks,
    rewrite_with_keys,
    write_quirky_pair,
)
from tests.test_runtime_parity import photo_like, reference_logits, relative_error

EXACT = ModelOptions(n_ctx=4096, threads=2, kv_cache_type="f32", flash_attn="off")
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def quirky(tiny_gguf_pair, tmp_path_factory):
    """Quirky copies of the tiny F32 pair, made once per variant."""
    made: dict[Quirks, tuple] = {}

    def get(quirks: Quirks):
        if quirks not in made:
            folder = tmp_path_factory.mktemp("quirky")
            made[quirks] = write_quirky_pair(tiny_gguf_pair[0], tiny_gguf_pair[1], folder, quirks)
        return made[quirks]

    return get


def image_logits(text, mmproj, image) -> np.ndarray:
    with PixtralModel.load(text, mmproj, EXACT) as model:
        return model.prompt_logits([Message("user", (Image(image), Text(QUESTION)))])


def test_pixtral_cpps_own_pair_has_no_quirks(tiny_gguf_pair):
    info = inspect_pair(ModelFiles(tiny_gguf_pair[0], tiny_gguf_pair[1]))
    q = info.quirks
    assert (q.text_writer, q.mmproj_writer) == (PIXTRAL_CPP_WRITER, PIXTRAL_CPP_WRITER)
    assert q.quirks == () and q.verdict == "runs faithfully as is"
    assert (q.text_type, q.mmproj_type, q.chat_template, q.pre_tokenizer) == ("model", "mmproj", "pixtral-cpp's",
                                                                              "tekken")


def test_the_llama_cpp_pair_is_named_and_its_quirks_listed(quirky):
    text, mmproj = quirky(LLAMA_CPP_HF)
    q = check_pair(ModelFiles(text, mmproj)).quirks  # runs: no problem left
    assert q.text_writer.startswith(LLAMA_CPP_WRITER) and q.mmproj_writer.startswith(LLAMA_CPP_WRITER)
    assert (q.pre_tokenizer, q.chat_template, q.has_img_break) == ("pixtral", "none", False)
    assert q.named("img_break_missing").handling is Handling.CORRECTED
    assert q.named("chat_template").handling is Handling.AS_IS
    assert q.named("pre_tokenizer").handling is Handling.AS_IS and "O'Donnell" in q.named("pre_tokenizer").what
    assert q.verdict.startswith("runs faithfully with a correction") and IMG_BREAK_TENSOR in q.verdict


def test_info_shows_the_facts_and_the_verdict(quirky):
    text, mmproj = quirky(LLAMA_CPP_HF)
    result = CliRunner().invoke(main, ["info", str(text), "--mmproj", str(mmproj)])
    assert result.exit_code == 0, result.output
    out = result.output
    for fact in (f"text        {LLAMA_CPP_WRITER}", "general.type  text model, mmproj mmproj",
                 "pre-tokenizer pixtral; chat template none", "[IMG_BREAK] missing from the mmproj",
                 "CLIP mean/std, as Pixtral", "context     131072",
                 "verdict      runs faithfully with a correction"):
        assert fact in out, fact


def test_the_missing_img_break_is_the_text_models_row_12(converted):
    text, _ = converted("F16", "F16")  # the vector dequantized from F16, as llama.cpp sees token 12
    header = read_gguf_header(text)
    row = np.asarray(header.tensor_data("token_embd.weight"))[12].astype(np.float32)
    np.testing.assert_array_equal(img_break_vector(header), row)


def test_the_row_is_dequantized_from_any_text_type(converted):
    import gguf

    text, _ = converted("Q4_K_M", "F16")
    header = read_gguf_header(text)
    embd = header.tensors["token_embd.weight"]
    assert embd.type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    whole = gguf.quants.dequantize(np.asarray(header.tensor_data(embd.name)).reshape(embd.ne[1], -1), embd.type)
    np.testing.assert_array_equal(img_break_vector(header), whole[12])


def test_without_img_break_the_image_logits_equal_the_pair_with_it(tiny_gguf_pair, quirky, private_cache):
    image = photo_like(100, 70, seed=3)
    with_it = image_logits(tiny_gguf_pair[0], tiny_gguf_pair[1], image)
    text, mmproj = quirky(LLAMA_CPP_HF)
    without = image_logits(text, mmproj, image)
    np.testing.assert_array_equal(without, with_it)  # F32 embedding row 12 == the F32 img_break, bit for bit
    copies = list(private_cache.rglob("*.gguf"))
    assert len(copies) == 1 and IMG_BREAK_TENSOR in read_gguf_header(copies[0]).tensors
    assert not list(private_cache.rglob("*.partial"))
    written = copies[0].stat().st_mtime_ns
    image_logits(text, mmproj, image)  # the second load reuses the copy
    assert copies[0].stat().st_mtime_ns == written and list(private_cache.rglob("*.gguf")) == copies


def test_the_llama_cpp_pair_matches_transformers(tiny_gguf_pair, quirky):
    """Parity with the reference, once, with the quirky pair (tolerances of tests/test_runtime_parity.py)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from pixtral_cpp.synthetic.tekken import real_tekken_path
    from tests.reference import load_reference

    image = photo_like(64, 48, seed=64)
    text, mmproj = quirky(LLAMA_CPP_HF)
    ours = image_logits(text, mmproj, image)
    expected, _ = reference_logits(load_reference(tiny_gguf_pair[2]), MistralTokenizer.from_file(
        str(real_tekken_path())), image, QUESTION, prepare_image(image).pixels)
    assert relative_error(ours, expected) < 1e-3
    assert int(ours.argmax()) == int(expected.argmax())


@pytest.mark.parametrize("template", [None, "mistral-v3-tekken", "{{ bos_token }}{% for m in messages %}"
                                      "{{ m['content'] }}{% endfor %}"])
def test_the_text_files_chat_template_does_not_change_pixtral_cpps_prompts(tiny_gguf_pair, quirky, template):
    image = photo_like(64, 48, seed=5)
    own = image_logits(tiny_gguf_pair[0], tiny_gguf_pair[1], image)
    text, mmproj = quirky(Quirks(img_break=True, chat_template=template, pre_tokenizer=KEEP))
    assert inspect_pair(ModelFiles(text, mmproj)).quirks.named("chat_template") is not None
    np.testing.assert_array_equal(image_logits(text, mmproj, image), own)


@pytest.mark.parametrize("quirks,quirk", [(OLD_LLAMA_CPP, "std_is_mean"),
                                          (Quirks(img_break=True, mean_std_swapped=True), "mean_std_swapped")])
def test_a_wrong_image_std_is_refused_before_llama_cpp_with_the_fix(quirky, quirks, quirk):
    text, mmproj = quirky(quirks)
    assert inspect_pair(ModelFiles(text, mmproj)).quirks.named(quirk).handling is Handling.REFUSED
    with pytest.raises(ModelError, match=r"image_std.*pixtral-cpp fix"):
        PixtralModel.load(text, mmproj, EXACT)
    result = CliRunner().invoke(main, ["info", str(text), "--mmproj", str(mmproj)])
    assert result.exit_code == 1 and "does not run" in result.output


def test_old_llama_cpp_std_is_named_after_its_bug(quirky):
    text, mmproj = quirky(OLD_LLAMA_CPP)
    with pytest.raises(ModelError, match=r"ggml-org/llama\.cpp#13208"):
        check_pair(ModelFiles(text, mmproj))


def test_a_missing_context_length_is_named_before_llama_cpp_loads(quirky):
    text, mmproj = quirky(LLAMA_CPP_NATIVE)  # also: template name only, INT32 scores (llama.cpp reads those)
    q = inspect_pair(ModelFiles(text, mmproj)).quirks
    assert q.context_length is None and q.chat_template == "the name 'mistral-v3-tekken'"
    with pytest.raises(ModelError, match=r"llama\.context_length is missing .*params\.json.*pixtral-cpp fix") as err:
        PixtralModel.load(text, mmproj, EXACT)
    assert "failed to load" not in str(err.value) and "scores" not in str(err.value)


def test_an_mmproj_without_img_break_beside_a_foreign_vocabulary_is_refused(quirky, tmp_path):
    text, mmproj = quirky(LLAMA_CPP_HF)
    tokens = list(read_gguf_header(text).metadata["tokenizer.ggml.tokens"])
    tokens[12] = "[SOMETHING]"
    renamed = rewrite_with_keys(text, tmp_path / text.name, {"tokenizer.ggml.tokens": (tokens, None)})
    quirk = inspect_pair(ModelFiles(renamed, mmproj)).quirks.named("img_break_missing")
    assert quirk.handling is Handling.REFUSED and "[IMG_BREAK]" in quirk.what
    with pytest.raises(ModelError, match=r"lacks v\.token_embd\.img_break and token 12"):
        check_pair(ModelFiles(renamed, mmproj))
