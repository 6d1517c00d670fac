"""One-field changes to a converted pair that llama.cpp would abort on (or answer wrongly with) are refused first.

Each case rewrites one metadata value of a copy of the tiny F16 pair and expects check_pair, `info` and
PixtralModel.load to name the key. For the classes that abort, a subprocess loads the same file through the
backend classes (no check_pair) and must die of SIGABRT: the proof that the check is needed.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType

from pixtral_cpp.cli import main
from pixtral_cpp.errors import ModelError
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.model_files import ModelFiles, check_pair, inspect_pair
from pixtral_cpp.options import ModelOptions
from tests.gguf_helpers import fill_tensor, rewrite_metadata

SMALL = ModelOptions(n_ctx=512, threads=2)
U32, F32, STR, ARRAY = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.ARRAY
EPS = "llama.attention.layer_norm_rms_epsilon"

# (file, key, new value, new GGUF type or None to keep it, words the message must hold)
CASES = {
    "text-eps-nan": ("text", EPS, math.nan, None, f"{EPS} = nan must be a finite positive number"),
    "text-eps-negative": ("text", EPS, -1e-5, None, f"{EPS} = -1e-05 must be a finite positive"),
    "text-eps-float64": ("text", EPS, 1e-5, GGUFValueType.FLOAT64, f"{EPS} = 1e-05 is stored as FLOAT64"),
    "text-heads-zero": ("text", "llama.attention.head_count", 0, None, "llama.attention.head_count = 0 must be"),
    "text-kv-heads-not-dividing": ("text", "llama.attention.head_count_kv", 3, None,
                                   "llama.attention.head_count_kv = 3 does not divide"),
    "text-blocks-string": ("text", "llama.block_count", "two", STR, "llama.block_count = 'two' is stored as STRING"),
    "text-blocks-float": ("text", "llama.block_count", 2.0, F32, "llama.block_count = 2 is stored as FLOAT32"),
    "text-blocks-array": ("text", "llama.block_count", [2], ARRAY, "llama.block_count = [2] is stored as ARRAY"),
    "text-blocks-zero": ("text", "llama.block_count", 0, None, "llama.block_count = 0 must be between 1 and 512"),
    "text-rope-base-nan": ("text", "llama.rope.freq_base", math.nan, None, "llama.rope.freq_base = nan"),
    "text-rope-scaling": ("text", "llama.rope.scaling.type", "weird", STR, "llama.rope.scaling.type = 'weird'"),
    "text-experts": ("text", "llama.expert_count", 4, U32, "llama.expert_count = 4 must be 0"),
    "text-head-size": ("text", "llama.attention.value_length", 32, None, "llama.attention.value_length = 32 differs"),
    "text-ffn-shape": ("text", "llama.feed_forward_length", 384, None,
                       "tensor blk.0.ffn_gate.weight has shape [256, 512], the metadata implies [256, 384]"),
    "mm-patch-size": ("mmproj", "clip.vision.patch_size", 14, None,
                      "clip.vision.patch_size = 14 does not match v.patch_embd.weight"),
    "mm-heads-zero": ("mmproj", "clip.vision.attention.head_count", 0, None,
                      "clip.vision.attention.head_count = 0 must be positive"),
    "mm-heads-not-dividing": ("mmproj", "clip.vision.attention.head_count", 3, None,
                              "clip.vision.attention.head_count = 3 does not divide clip.vision.embedding_length"),
    "mm-blocks-string": ("mmproj", "clip.vision.block_count", "three", STR,
                         "clip.vision.block_count = 'three' is stored as STRING"),
    "mm-blocks-float": ("mmproj", "clip.vision.block_count", 3.0, F32,
                        "clip.vision.block_count = 3 is stored as FLOAT32"),
    "mm-eps-nan": ("mmproj", "clip.vision.attention.layer_norm_epsilon", math.nan, None,
                   "clip.vision.attention.layer_norm_epsilon = nan must be a finite positive"),
    "mm-merge": ("mmproj", "clip.vision.spatial_merge_size", 2, U32, "clip.vision.spatial_merge_size = 2 must be"),
    "mm-image-size": ("mmproj", "clip.vision.image_size", 1000, None,
                      "clip.vision.patch_size = 16 does not divide clip.vision.image_size = 1000"),
    "mm-std-zero": ("mmproj", "clip.vision.image_std", [0.0, 0.0, 0.0], None, "clip.vision.image_std = [0.0, 0.0"),
    "mm-no-vision": ("mmproj", "clip.has_vision_encoder", False, None, "clip.has_vision_encoder = False must be"),
}
# Measured on llama-cpp-python 0.3.36: loaded without our checks, every ABORTS case below and also
# text-eps-negative, text-blocks-zero, text-rope-scaling, text-experts, mm-blocks-float, mm-eps-nan and
# mm-merge kill the process with SIGABRT (GGML_ASSERT); text-rope-base-nan gives NaN logits; the text
# key type cases, text-heads-zero and text-head-size make llama.cpp refuse the file. A few are run here.
ABORTS = ("text-eps-nan", "mm-patch-size", "mm-heads-zero", "mm-heads-not-dividing", "mm-blocks-string")

_LOAD_WITHOUT_CHECKS = """
import sys
import numpy as np
from pixtral_cpp.backend import TextModel, TextModelOptions, VisionContext
with TextModel(sys.argv[1], TextModelOptions(n_ctx=256, n_threads=1)) as model:
    model.eval_tokens([1, 2, 3])
    with VisionContext(sys.argv[2], model, threads=1) as vision:
        vision.encode_rgb(np.zeros((32, 32, 3), np.uint8))
"""


def mutated_pair(pair: tuple[Path, Path], folder: Path, case: str) -> ModelFiles:
    which, key, value, vtype, _ = CASES[case]
    text, mmproj = pair
    folder.mkdir(parents=True, exist_ok=True)
    new_text, new_mmproj = folder / text.name, folder / mmproj.name
    if which == "text":
        rewrite_metadata(text, new_text, key, value, vtype, GGUFValueType.UINT32 if vtype == ARRAY else None)
        shutil.copyfile(mmproj, new_mmproj)
    else:
        shutil.copyfile(text, new_text)
        rewrite_metadata(mmproj, new_mmproj, key, value, vtype)
    return ModelFiles(new_text, new_mmproj)


@pytest.fixture(scope="module")
def mutated(pair, tmp_path_factory):
    """Every case's pair, written once for the module (name -> ModelFiles)."""
    root = tmp_path_factory.mktemp("mutated")
    return {case: mutated_pair(pair, root / case, case) for case in CASES}


def test_the_unchanged_pair_has_no_problems(pair):
    assert inspect_pair(ModelFiles(*pair)).problems == ()


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_pair_names_the_key(mutated, case):
    files, (which, *_, words) = mutated[case], CASES[case]
    with pytest.raises(ModelError) as raised:
        check_pair(files)
    message = str(raised.value)
    assert words in message and "re-convert or re-download it" in message
    assert (files.text if which == "text" else files.mmproj).name in message
    assert "\n" not in message


def test_load_refuses_before_llama_cpp(mutated):
    for case in ("text-eps-nan", "mm-patch-size", "mm-heads-zero", "text-heads-zero"):
        with pytest.raises(ModelError, match=CASES[case][1].replace(".", r"\.")):
            PixtralModel.load(mutated[case].text, mutated[case].mmproj, SMALL)


def test_info_lists_the_problem(mutated):
    files = mutated["text-heads-zero"]  # used to be a ZeroDivisionError traceback in read_text_info
    result = CliRunner().invoke(main, ["info", str(files.text), "--mmproj", str(files.mmproj)])
    assert result.exit_code == 1, result.output
    assert "DOES NOT MATCH" in result.output
    assert "llama.attention.head_count = 0 must be positive" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("case", ABORTS)
def test_without_the_check_llama_cpp_aborts(mutated, case):
    files = mutated[case]
    run = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_CHECKS, str(files.text), str(files.mmproj)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGABRT, (run.returncode, run.stderr[-2000:])


def test_nan_weights_raise_instead_of_an_empty_answer(pair, tmp_path):
    folder = tmp_path / "nan"
    folder.mkdir()
    text = fill_tensor(pair[0], folder / pair[0].name, "output_norm.weight", math.nan)
    mmproj = Path(shutil.copyfile(pair[1], folder / pair[1].name))
    assert inspect_pair(ModelFiles(text, mmproj)).problems == ()  # every header check passes
    with PixtralModel.load(text, mmproj, SMALL) as model:
        with pytest.raises(ModelError, match="the model produced NaN/infinite logits: .* is probably corrupt; "
                                             "re-convert or re-download it"):
            model.describe(np.zeros((32, 32, 3), np.uint8), "Describe.", max_tokens=4)
    image = tmp_path / "black.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    run = subprocess.run([sys.executable, "-m", "pixtral_cpp.cli", "describe", str(image), "-m", str(text),
                          "--ctx", "512", "--threads", "2", "--max-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and "NaN/infinite logits" in error_lines[0], run.stderr
    assert "Traceback" not in run.stderr
