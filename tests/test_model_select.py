"""llama.cpp's `-hf` file choice as pixtral-cpp applies it to repos and folders (pixtral_cpp.model_select), and
what `--model` accepts on disk: a file, a folder (Q4_K_M, then Q8_0), FOLDER:QUANT (pixtral_cpp.model_sources)."""

from __future__ import annotations

import os
import shutil

import pytest

from pixtral_cpp.errors import ModelError
from pixtral_cpp.model_files import find_model_files
from pixtral_cpp.model_select import choose_mmproj_file, choose_text_file, quant_of, shards_of, split_name
from pixtral_cpp.model_sources import resolve_model
from tests.hub_cache import BARTOWSKI_PREFIX as P

GGML = ["README.md", "mmproj-pixtral-12b-f16.gguf", "pixtral-12b-Q4_K_M.gguf", "pixtral-12b-Q8_0.gguf",
        "pixtral-12b-f16.gguf"]
BARTOWSKI = [f"{P}-Q4_K_M-imatrix.gguf", f"{P}-Q4_K_M.gguf", f"{P}-Q5_K_M.gguf", f"{P}-Q8_0.gguf",
             f"mmproj-{P}-f16.gguf", f"{P}-f32-00001-of-00002.gguf", f"{P}-f32-00002-of-00002.gguf"]


def taken(names, quant=None):
    return choose_text_file(names, quant).name


def test_the_default_is_q4_k_m_then_q8_0_then_the_first_model():
    assert taken(GGML) == "pixtral-12b-Q4_K_M.gguf"
    assert taken([n for n in GGML if "Q4_K_M" not in n]) == "pixtral-12b-Q8_0.gguf"
    # neither default: llama.cpp falls back to the first text model file (only when no tag was asked for)
    assert taken(["b-Q6_K.gguf", "a-Q5_K_M.gguf", "mmproj-a-f16.gguf"]) == "a-Q5_K_M.gguf"


def test_the_note_says_what_was_taken_and_how_to_choose():
    note = choose_text_file(GGML).note
    assert note is not None and "pixtral-12b-Q4_K_M.gguf" in note and "the default Q4_K_M" in note
    assert "Q8_0, F16" in note and ":QUANT" in note
    assert choose_text_file(["only-Q8_0.gguf", "mmproj-only-f16.gguf"]).note is None  # no choice, no note


def test_an_asked_tag_that_no_file_has_is_refused_with_what_is_there():
    with pytest.raises(ModelError, match=r"no Q6_K text model in the list; it holds .*pixtral-12b-Q4_K_M\.gguf"):
        choose_text_file(GGML, "Q6_K")


def test_tags_match_in_any_case_and_only_before_a_dot_or_dash():
    assert taken(GGML, "q8_0") == "pixtral-12b-Q8_0.gguf"
    assert taken(GGML, "F16") == "pixtral-12b-f16.gguf"
    assert taken(["m-Q4_K_M_L.gguf", "m-Q4_K_M-v2.gguf"], "Q4_K_M") == "m-Q4_K_M-v2.gguf"
    with pytest.raises(ModelError):
        choose_text_file(["m-Q4_K_M_L.gguf"], "Q4_K_M")  # `_L` follows: another type
    with pytest.raises(ModelError):
        choose_text_file(["m-Q4_K.gguf"], "Q4_K_M")


def test_mmproj_and_imatrix_files_are_never_text_models():
    # the importance matrix sorts before the model: only the skip rule keeps it out
    assert taken(BARTOWSKI) == f"{P}-Q4_K_M.gguf"
    assert taken(BARTOWSKI, "Q5_K_M") == f"{P}-Q5_K_M.gguf"
    with pytest.raises(ModelError, match="no text model"):
        choose_text_file(["mmproj-x-f16.gguf", "x.imatrix.gguf", "MMPROJ-y-F16.gguf", "README.md"])


def test_a_split_model_is_its_first_shard_and_brings_all_of_them():
    assert taken(BARTOWSKI, "F32") == f"{P}-f32-00001-of-00002.gguf"
    assert shards_of(list(reversed(BARTOWSKI)), f"{P}-f32-00001-of-00002.gguf") == [
        f"{P}-f32-00001-of-00002.gguf", f"{P}-f32-00002-of-00002.gguf"]
    assert shards_of(BARTOWSKI, f"{P}-Q8_0.gguf") == [f"{P}-Q8_0.gguf"]
    # a later shard is never the model, even when its name matches first
    assert taken(["m-Q8_0-00002-of-00002.gguf", "m-Q8_0-00001-of-00002.gguf"], "Q8_0") == \
        "m-Q8_0-00001-of-00002.gguf"
    assert split_name("dir/m-Q8_0-00002-of-00003.gguf") == split_name("dir/m-Q8_0-00002-of-00003.gguf")
    assert (split_name("m-Q8_0-00002-of-00003.gguf").index, split_name("m-Q8_0-00002-of-00003.gguf").count) == (2, 3)
    assert quant_of("mmproj-pixtral-12b-f16.gguf") == "F16" and quant_of("x-q4_k_m.gguf") == "Q4_K_M"


MMPROJS = ["m-Q4_K_M.gguf", "mmproj-m-Q8_0.gguf", "mmproj-m-f16.gguf", "mmproj-m-F32.gguf", "mmproj-m-bf16.gguf"]


def test_several_mmproj_prefer_f16_then_bf16_f32_q8_0_in_any_case():
    choice = choose_mmproj_file(MMPROJS, "m-Q4_K_M.gguf")
    assert choice.name == "mmproj-m-f16.gguf"
    assert choice.note is not None and "took mmproj-m-f16.gguf (F16)" in choice.note and "--mmproj-quant" in choice.note
    no_f16 = [n for n in MMPROJS if n != "mmproj-m-f16.gguf"]
    assert choose_mmproj_file(no_f16, "m-Q4_K_M.gguf").name == "mmproj-m-bf16.gguf"
    assert choose_mmproj_file(["m-Q4_K_M.gguf", "mmproj-m-Q8_0.gguf", "mmproj-m-F32.gguf"],
                              "m-Q4_K_M.gguf").name == "mmproj-m-F32.gguf"
    # the case that picked Q8_0 before: a lower-case f16 beside an upper-case Q8_0
    assert choose_mmproj_file(["p-Q4_K_M.gguf", "mmproj-p-f16.gguf", "mmproj-p-Q8_0.gguf"], "p-Q4_K_M.gguf").name \
        == "mmproj-p-f16.gguf"
    assert choose_mmproj_file(["m-Q8_0.gguf", "mmproj-m-f16.gguf"], "m-Q8_0.gguf").note is None


def test_mmproj_quant_chooses_and_a_missing_one_names_what_is_offered():
    assert choose_mmproj_file(MMPROJS, "m-Q4_K_M.gguf", "q8_0").name == "mmproj-m-Q8_0.gguf"
    with pytest.raises(ModelError, match=r"no Q4_0 mmproj beside m-Q4_K_M\.gguf in the list; offered: F32, Q8_0, "
                                         r"BF16, F16"):
        choose_mmproj_file(MMPROJS, "m-Q4_K_M.gguf", "Q4_0")
    with pytest.raises(ModelError, match=r"no mmproj \(mmproj-\*\.gguf\) beside m-Q4_K_M\.gguf"):
        choose_mmproj_file(["m-Q4_K_M.gguf", "README.md"], "m-Q4_K_M.gguf")


def test_the_mmproj_comes_from_the_model_s_folder_or_the_nearest_above():
    names = ["Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "mmproj-m-f16.gguf", "Q8_0/m-Q8_0.gguf",
             "Q8_0/mmproj-m-F32.gguf", "other/mmproj-m-BF16.gguf"]
    assert choose_mmproj_file(names, "Q8_0/m-Q8_0.gguf").name == "Q8_0/mmproj-m-F32.gguf"  # same folder first
    assert choose_mmproj_file(names, "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf").name == "mmproj-m-f16.gguf"
    assert taken(names) == "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"


def test_a_projector_of_the_same_model_wins_over_a_more_precise_one_of_another():
    names = ["Pixtral-12B-2409-Q4_K_M.gguf", "mmproj-Other-F16.gguf", "mmproj-Pixtral-12B-2409-Q8_0.gguf"]
    assert choose_mmproj_file(names, names[0]).name == "mmproj-Pixtral-12B-2409-Q8_0.gguf"


# -- --model on disk --------------------------------------------------------------------------------------


@pytest.fixture
def quant_folder(converted, tmp_path):
    """A folder as a user gets by downloading bartowski's repo: several quantizations, two projectors."""
    text, mmproj = converted("F16", "F16")
    folder = tmp_path / "pixtral"
    folder.mkdir()
    for name in (f"{P}-Q5_K_M.gguf", f"{P}-Q8_0.gguf", f"{P}-Q4_K_M.gguf"):
        os.link(text, folder / name)
    os.link(mmproj, folder / f"mmproj-{P}-f16.gguf")
    os.link(mmproj, folder / f"mmproj-{P}-Q8_0.gguf")
    return folder


def test_a_folder_takes_q4_k_m_and_the_f16_projector_saying_so(quant_folder, caplog):
    resolved = resolve_model(quant_folder)
    assert resolved.files.text == quant_folder / f"{P}-Q4_K_M.gguf"
    assert resolved.files.mmproj == quant_folder / f"mmproj-{P}-f16.gguf"
    assert len(resolved.notes) == 2 and "Q5_K_M, Q8_0" in resolved.notes[0] and "(F16)" in resolved.notes[1]
    caplog.set_level("INFO", logger="pixtral_cpp.model_files")
    assert find_model_files(quant_folder) == resolved.files
    assert "took mmproj-" in caplog.text  # the library logs what it chose


def test_folder_colon_quant_and_a_file_in_the_folder(quant_folder):
    files = resolve_model(f"{quant_folder}:q5_k_m", mmproj_quant="Q8_0").files
    assert (files.text.name, files.mmproj.name) == (f"{P}-Q5_K_M.gguf", f"mmproj-{P}-Q8_0.gguf")
    files = resolve_model(quant_folder / f"{P}-Q8_0.gguf").files
    assert (files.text.name, files.mmproj.name) == (f"{P}-Q8_0.gguf", f"mmproj-{P}-f16.gguf")
    with pytest.raises(ModelError, match=rf"no IQ2_XS text model in {quant_folder}; it holds "):
        resolve_model(f"{quant_folder}:IQ2_XS")


def test_a_folder_without_q4_k_m_or_q8_0_takes_its_first_model(quant_folder):
    for name in (f"{P}-Q8_0.gguf", f"{P}-Q4_K_M.gguf"):
        (quant_folder / name).unlink()
    assert resolve_model(quant_folder).files.text.name == f"{P}-Q5_K_M.gguf"


def test_an_existing_path_wins_over_a_hub_spelling(converted, tmp_path, monkeypatch):
    text, mmproj = converted("F16", "F16")
    folder = tmp_path / "user" / "repo"
    folder.mkdir(parents=True)
    shutil.copy(text, folder / "m-F16.gguf")
    shutil.copy(mmproj, folder / "mmproj-m-F16.gguf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert resolve_model("user/repo").files.text.resolve() == folder / "m-F16.gguf"
    with pytest.raises(ModelError, match=r"user/other@main is not in the local Hugging Face cache .*\(read "
                                         r"'user/other:Q4_K_M' as a hub repo: no file or folder has that name\)"):
        resolve_model("user/other:Q4_K_M")
    with pytest.raises(ModelError, match=r"no model at .*missing\.gguf \(--model\)"):
        resolve_model("./missing.gguf")
