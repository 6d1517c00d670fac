"""The converter's quantization mixes equal llama.cpp's own quantizer, tensor type for type and byte for byte.

pixtral-cpp quantizes while converting (no lossless intermediate file); llama.cpp's route is a BF16
GGUF quantized by `llama_model_quantize`. Both must give the same file contents for every type a user
can ask for, on the tiny shape (rows of 256: no fallbacks) and on an odd shape (fallback types, fewer
than four query heads per KV head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from pixtral_cpp.backend.row_quantizer import RowQuantizer
from pixtral_cpp.convert import ConvertOptions, convert_checkpoint
from pixtral_cpp.convert.quant_mix import MIXES
from pixtral_cpp.errors import QuantizationError
from pixtral_cpp.gguf_file import read_gguf_header
from pixtral_cpp.synthetic import write_synthetic_checkpoint
from pixtral_cpp.synthetic.shapes import SyntheticShape, TextShape, VisionShape
from tests.llama_reference import LLAMA_FTYPES, quantize_gguf

QUANTIZED = [name for name, mix in MIXES.items() if mix.quantized]
# Rows of 96 and 144 values: K-quants fall back to 32-blocks, 144-value rows of Q4_0/Q5_x to F16;
# two query heads per KV head changes Q2_K's and IQ4's attn_v choice.
ODD = SyntheticShape(TextShape(hidden=96, layers=3, heads=4, kv_heads=2, head_dim=24, ffn=144),
                     VisionShape(hidden=64, layers=1, heads=2, ffn=128))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(checkpoint, its BF16 text GGUF) per shape: the common input of both routes."""
    made = {}
    for label, shape in (("tiny", "tiny"), ("odd", ODD)):
        root = tmp_path_factory.mktemp(f"mix-{label}")
        source = write_synthetic_checkpoint(root / "src", shape=shape, seed=3, tokenizer="small")
        bf16 = convert_checkpoint(ConvertOptions(source=source, output_dir=root / "bf16", quant="BF16")).text_path
        made[label] = (source, bf16)
    return made


def _assert_same_file(ours: Path, reference: Path) -> None:
    a, b = read_gguf_header(ours), read_gguf_header(reference)
    assert a.get("general.file_type") == b.get("general.file_type")
    assert {n: t.type for n, t in a.tensors.items()} == {n: t.type for n, t in b.tensors.items()}
    for tensor in a.tensors.values():
        assert np.array_equal(a.tensor_data(tensor.name).view(np.uint8), b.tensor_data(tensor.name).view(np.uint8)), \
            f"{tensor.name} ({tensor.type.name}) differs from llama.cpp's quantizer"


def _check_mix(sources: dict[str, tuple[Path, Path]], label: str, quant: str, tmp_path: Path) -> None:
    source, bf16 = sources[label]
    ours = convert_checkpoint(ConvertOptions(source=source, output_dir=tmp_path / "ours", quant=quant)).text_path
    reference = tmp_path / "reference.gguf"
    quantize_gguf(bf16, reference, LLAMA_FTYPES[quant], threads=2)
    _assert_same_file(ours, reference)


@pytest.mark.parametrize("quant", QUANTIZED)
def test_mix_matches_llama_quantizer(sources, quant, tmp_path):
    _check_mix(sources, "tiny", quant, tmp_path)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "Q5_0"])
def test_fallbacks_match_llama_quantizer(sources, quant, tmp_path):
    _check_mix(sources, "odd", quant, tmp_path)


def test_odd_shape_really_falls_back(sources, tmp_path):
    """Guards the test above: the odd shape must exercise the fallback and small-GQA rules."""
    source, _ = sources["odd"]
    types = {n: t.type for n, t in read_gguf_header(convert_checkpoint(ConvertOptions(
        source=source, output_dir=tmp_path, quant="Q2_K")).text_path).tensors.items()}
    assert types["blk.0.attn_q.weight"] == Q.Q4_0  # Q2_K -> Q4_0 on rows of 96
    assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 144: not even 32-blocks
    assert types["output.weight"] == Q.Q8_0


def test_tiny_q4_k_m_uses_the_mix(sources, tmp_path):
    source, _ = sources["tiny"]
    types = {n: t.type for n, t in read_gguf_header(convert_checkpoint(ConvertOptions(
        source=source, output_dir=tmp_path, quant="Q4_K_M")).text_path).tensors.items()}
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    # Two layers: llama.cpp's "more bits" spread picks the second for attn_v and ffn_down.
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == (Q.Q4_K, Q.Q6_K)
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == (Q.Q4_K, Q.Q6_K)
    assert types["blk.0.attn_norm.weight"] == Q.F32


def test_row_quantizer_refuses_what_ggml_cannot_store():
    with RowQuantizer(threads=1) as quantizer:
        with pytest.raises(QuantizationError, match="blocks of 256"):
            quantizer.quantize(np.zeros((2, 96), np.float32), "F32", Q.Q4_K)
        with pytest.raises(QuantizationError, match="importance matrix"):
            quantizer.quantize(np.zeros((2, 256), np.float32), "F32", Q.IQ2_XXS)
        with pytest.raises(QuantizationError, match="invalid"):
            quantizer.quantize(np.full((1, 256), np.inf, np.float32), "F32", Q.Q4_K)


def test_row_quantizer_threads_agree(sources):
    rows = np.random.default_rng(0).standard_normal((1000, 512)).astype(np.float32)
    with RowQuantizer(threads=1) as one, RowQuantizer(threads=3) as three:
        assert np.array_equal(one.quantize(rows, "F32", Q.Q4_K), three.quantize(rows, "F32", Q.Q4_K))
