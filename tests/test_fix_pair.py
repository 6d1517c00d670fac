"""`pixtral-cpp fix`: a pair with llama.cpp's converter's quirks (tests/quirky_files.py) becomes one with none,
every other byte copied, that answers like pixtral-cpp's own pair; refusals and interruptions leave nothing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pixtral_cpp.cli import main
from pixtral_cpp.conversation import Image, Message, Text
from pixtral_cpp.convert.chat_template import PIXTRAL_CHAT_TEMPLATE
from pixtral_cpp.errors import ModelError, OutputError
from pixtral_cpp.fix_pair import fix_pair
from pixtral_cpp.gguf_file import read_gguf_header
from pixtral_cpp.gguf_keys import CLIP_IMAGE_STD, IMG_BREAK_TENSOR, TextKeys
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.model_files import ModelFiles, inspect_pair
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.pair_quirks import FIXED_BY_KEY, LLAMA_CPP_WRITER, PIXTRAL_CPP_FIX_WRITER
from tests.quirky_files import KEEP, LLAMA_CPP_HF, LLAMA_CPP_NATIVE, Quirks, rewrite_with_keys, write_quirky_pair
from tests.test_runtime_parity import photo_like

EXACT = ModelOptions(n_ctx=4096, threads=2, kv_cache_type="f32", flash_attn="off")
EVERY_QUIRK = Quirks(std_is_mean=True, context_length=False)  # no img_break, no template, pre pixtral, size label


@pytest.fixture(scope="module")
def quirky_pair(tiny_gguf_pair, tmp_path_factory):
    return ModelFiles(*write_quirky_pair(tiny_gguf_pair[0], tiny_gguf_pair[1], tmp_path_factory.mktemp("q"),
                                         EVERY_QUIRK))


@pytest.fixture(scope="module")
def fixed(quirky_pair, tmp_path_factory):
    return fix_pair(quirky_pair, tmp_path_factory.mktemp("fixed") / "out")


def test_the_fixed_pair_has_no_quirk_left(quirky_pair, fixed):
    assert len(inspect_pair(quirky_pair).quirks.quirks) == 5  # std, img_break, context length, pre, template
    info = inspect_pair(ModelFiles(fixed.text_path, fixed.mmproj_path))
    q = info.quirks
    assert info.problems == () and q.quirks == () and q.verdict == "runs faithfully as is"
    assert q.text_writer.startswith(f"{PIXTRAL_CPP_FIX_WRITER}, from a file by {LLAMA_CPP_WRITER}")
    assert (q.image_std, q.context_length, q.chat_template) == (pytest.approx(CLIP_IMAGE_STD), 131072,
                                                                "pixtral-cpp's")
    assert (fixed.text_path.name, fixed.mmproj_path.name) == (quirky_pair.text.name, quirky_pair.mmproj.name)
    assert len(fixed.corrections) == 5


def test_every_other_byte_is_copied(quirky_pair, fixed):
    for source, out in ((quirky_pair.text, fixed.text_path), (quirky_pair.mmproj, fixed.mmproj_path)):
        a, b = read_gguf_header(source), read_gguf_header(out)
        for name, tensor in a.tensors.items():
            assert (b.tensors[name].type, b.tensors[name].ne) == (tensor.type, tensor.ne)
            assert bytes(b.tensor_data(name)) == bytes(a.tensor_data(name)), name
        changed = {k for k in set(a.metadata) | set(b.metadata) if a.metadata.get(k) != b.metadata.get(k)}
        assert changed <= {TextKeys.CONTEXT_LENGTH, "tokenizer.chat_template", "tokenizer.ggml.pre",
                           "clip.vision.image_std", FIXED_BY_KEY}
    text, mmproj = read_gguf_header(fixed.text_path), read_gguf_header(fixed.mmproj_path)
    assert text.metadata["tokenizer.chat_template"] == PIXTRAL_CHAT_TEMPLATE
    assert text.metadata["tokenizer.ggml.pre"] == "tekken"  # llama.cpp's rule nearest to mistral-common's
    row = np.asarray(text.tensor_data("token_embd.weight"))[12]
    np.testing.assert_array_equal(np.asarray(mmproj.tensor_data(IMG_BREAK_TENSOR)), row)


def test_the_fixed_pair_answers_like_pixtral_cpps_own(tiny_gguf_pair, fixed, private_cache):
    image, question = photo_like(100, 70, seed=9), "What is in this picture?"
    messages = [Message("user", (Image(image), Text(question)))]
    answers = []
    for text, mmproj in ((tiny_gguf_pair[0], tiny_gguf_pair[1]), (fixed.text_path, fixed.mmproj_path)):
        with PixtralModel.load(text, mmproj, EXACT) as model:
            answers.append((model.prompt_logits(messages),
                            model.describe(image, question, max_tokens=8, temperature=0).text))
    np.testing.assert_array_equal(answers[1][0], answers[0][0])
    assert answers[1][1] == answers[0][1]
    assert not private_cache.exists()  # libmtmd loaded the fixed mmproj itself: no runtime correction


def test_a_native_layout_pair_gets_its_context_length(tiny_gguf_pair, tmp_path):
    files = ModelFiles(*write_quirky_pair(tiny_gguf_pair[0], tiny_gguf_pair[1], tmp_path / "q", LLAMA_CPP_NATIVE))
    result = fix_pair(files, tmp_path / "out", keep_template=True)
    q = inspect_pair(ModelFiles(result.text_path, result.mmproj_path)).quirks
    assert q.context_length == 131072 and q.chat_template == "the name 'mistral-v3-tekken'"  # kept
    with PixtralModel.load(result.text_path, result.mmproj_path, EXACT) as model:
        assert model.n_ctx == 4096


@pytest.mark.parametrize("stop_in", ["text model", "mmproj"])
def test_an_interrupted_fix_leaves_no_finished_looking_file(quirky_pair, tmp_path, stop_in):
    class StopHalfway:
        def begin(self, label, total, unit="bytes"):
            self.label, self.total, self.done = label, total, 0

        def advance(self, amount):
            self.done += amount
            if self.label.startswith(stop_in) and self.done >= self.total // 2:
                raise KeyboardInterrupt

        def end(self):
            pass

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fix_pair(quirky_pair, out, progress=StopHalfway())
    assert list(out.iterdir()) == []


def test_refusals_before_any_write(quirky_pair, fixed, tmp_path, monkeypatch):
    with pytest.raises(OutputError, match="holds the source files"):
        fix_pair(quirky_pair, quirky_pair.text.parent)
    with pytest.raises(OutputError, match="already exists"):
        fix_pair(quirky_pair, fixed.text_path.parent)
    # A full disk cannot be made here: the free space that shutil reports is what the check reads.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match="not enough free disk space"):
        fix_pair(quirky_pair, tmp_path / "full")
    assert list((tmp_path / "full").glob("*.gguf*")) == []


def test_a_pair_that_fix_cannot_correct_is_refused(quirky_pair, tmp_path):
    tokens = list(read_gguf_header(quirky_pair.text).metadata["tokenizer.ggml.tokens"])
    tokens[12] = "[SOMETHING]"
    foreign = rewrite_with_keys(quirky_pair.text, tmp_path / "foreign.gguf", {"tokenizer.ggml.tokens": (tokens, None)})
    with pytest.raises(ModelError, match=r"fix cannot correct this pair: .*token 12"):
        fix_pair(ModelFiles(foreign, quirky_pair.mmproj), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_fix_command(quirky_pair, tmp_path):
    out = tmp_path / "out"
    args = ["fix", str(quirky_pair.text), "--mmproj", str(quirky_pair.mmproj), "-o", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"added {IMG_BREAK_TENSOR}" in result.output
    assert f"mmproj      {out / quirky_pair.mmproj.name}" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "already exists" in again.output
    info = CliRunner().invoke(main, ["info", str(out / quirky_pair.text.name), "--mmproj",
                                     str(out / quirky_pair.mmproj.name)])
    assert info.exit_code == 0 and "verdict      runs faithfully as is" in info.output


def test_an_unquirky_pair_is_copied_as_it_is(tiny_gguf_pair, tmp_path):
    result = fix_pair(ModelFiles(tiny_gguf_pair[0], tiny_gguf_pair[1]), tmp_path / "out",
                      keep_template=True)
    assert result.corrections == ()
    assert result.mmproj_path.read_bytes() == tiny_gguf_pair[1].read_bytes()


def test_the_llama_cpp_default_pair_needs_only_img_break_pre_and_template(tiny_gguf_pair, tmp_path):
    files = ModelFiles(*write_quirky_pair(tiny_gguf_pair[0], tiny_gguf_pair[1], tmp_path / "q", LLAMA_CPP_HF))
    result = fix_pair(files, tmp_path / "out")
    assert [c.split()[1] for c in result.corrections] == ["tokenizer.ggml.pre", "pixtral-cpp's", IMG_BREAK_TENSOR]


def test_swapped_mean_and_std_are_put_back(tiny_gguf_pair, tmp_path):
    files = ModelFiles(*write_quirky_pair(tiny_gguf_pair[0], tiny_gguf_pair[1], tmp_path / "q",
                                          Quirks(img_break=True, mean_std_swapped=True, chat_template=KEEP)))
    result = fix_pair(files, tmp_path / "out", keep_template=True)
    fixed_header, own = read_gguf_header(result.mmproj_path), read_gguf_header(tiny_gguf_pair[1])
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        assert fixed_header.metadata[key] == pytest.approx(own.metadata[key], rel=1e-6)
    assert inspect_pair(ModelFiles(result.text_path, result.mmproj_path)).quirks.quirks == ()
