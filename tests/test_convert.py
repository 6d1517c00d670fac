"""The converter on tiny random Pixtrals: layouts, GGUF contents, types, metadata."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from pixtral_cpp.convert import ConvertOptions, convert_checkpoint, plan_conversion
from pixtral_cpp.convert.config import parse_config_json
from pixtral_cpp.gguf_file import read_gguf_header
from pixtral_cpp.synthetic import SHAPES
from tests.conftest import convert_tiny
from tests.gguf_helpers import field, field_type, ne, read_gguf, tensor_bytes, tensors

TINY = SHAPES["tiny"]


def _bf16_row_as_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module")
def both_layouts_bf16(tmp_path_factory, tiny_native, tiny_hf):
    out = tmp_path_factory.mktemp("layouts")
    native = convert_tiny(tiny_native, out / "native", "BF16")
    hf = convert_tiny(tiny_hf, out / "hf", "BF16")
    return native, hf


@pytest.mark.parametrize("kind", [0, 1], ids=["text", "mmproj"])
def test_both_layouts_give_bit_identical_tensors(both_layouts_bf16, kind):
    native, hf = (read_gguf(pair[kind]) for pair in both_layouts_bf16)
    a, b = tensors(native), tensors(hf)
    assert list(a) == list(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert ne(a[name]) == ne(b[name]), name
        assert tensor_bytes(a[name]) == tensor_bytes(b[name]), f"{name} differs between layouts"


def test_layouts_agree_on_metadata_but_for_the_training_context(both_layouts_bf16):
    native, hf = (read_gguf(pair[0]) for pair in both_layouts_bf16)
    # params.json has no context length (we write Mistral's advertised 128k); config.json says 1024000.
    assert field(native, "llama.context_length") == 131072
    assert field(hf, "llama.context_length") == 1024000
    for key in ("llama.embedding_length", "llama.attention.key_length", "llama.rope.freq_base",
                "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert field(native, key) == field(hf, key), key


def test_text_gguf_layout(converted):
    text, _ = converted("F32")
    reader = read_gguf(text)
    t = tensors(reader)
    assert len(t) == 3 + TINY.text.layers * 9
    h, vocab = TINY.text.hidden, 131072
    assert ne(t["token_embd.weight"]) == [h, vocab]
    assert ne(t["output.weight"]) == [h, vocab]
    assert ne(t["blk.0.attn_q.weight"]) == [h, TINY.text.heads * TINY.text.head_dim]
    assert ne(t["blk.1.attn_k.weight"]) == [h, TINY.text.kv_heads * TINY.text.head_dim]
    assert ne(t["blk.1.attn_output.weight"]) == [TINY.text.heads * TINY.text.head_dim, h]
    assert ne(t["blk.0.ffn_down.weight"]) == [TINY.text.ffn, h]
    assert all(x.tensor_type == Q.F32 for x in t.values())
    expected_keys = {
        "general.architecture": ("llama", V.STRING),
        "llama.context_length": (131072, V.UINT32),
        "llama.embedding_length": (h, V.UINT32),
        "llama.block_count": (TINY.text.layers, V.UINT32),
        "llama.feed_forward_length": (TINY.text.ffn, V.UINT32),
        "llama.attention.head_count": (TINY.text.heads, V.UINT32),
        "llama.attention.head_count_kv": (TINY.text.kv_heads, V.UINT32),
        "llama.attention.key_length": (TINY.text.head_dim, V.UINT32),
        "llama.attention.value_length": (TINY.text.head_dim, V.UINT32),
        "llama.rope.dimension_count": (TINY.text.head_dim, V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("tekken", V.STRING),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32),
        "tokenizer.ggml.unknown_token_id": (0, V.UINT32),
        "tokenizer.ggml.padding_token_id": (11, V.UINT32),
        "general.file_type": (int(gguf.LlamaFileType.ALL_F32), V.UINT32),
    }
    for key, (value, vtype) in expected_keys.items():
        assert field(reader, key) == value, key
        assert field_type(reader, key) == vtype, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(1e9)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(reader, "general.name") == "Pixtral-tiny"
    assert "[INST]" in field(reader, "tokenizer.chat_template")
    assert len(field(reader, "tokenizer.ggml.tokens")) == vocab


def test_mmproj_gguf_layout(converted, tiny_native):
    _, mmproj = converted("F32")
    reader = read_gguf(mmproj)
    t = tensors(reader)
    v = TINY.vision
    assert len(t) == 2 + v.layers * 9 + 4 + 1
    assert ne(t["v.patch_embd.weight"]) == [16, 16, 3, v.hidden]
    assert ne(t["mm.1.weight"]) == [v.hidden, TINY.text.hidden]
    assert ne(t["mm.2.weight"]) == [TINY.text.hidden, TINY.text.hidden]
    assert ne(t["v.token_embd.img_break"]) == [TINY.text.hidden]
    assert "v.post_ln.weight" not in t and "mm.patch_merger.weight" not in t
    expected_keys = {
        "general.architecture": "clip", "clip.projector_type": "pixtral", "clip.has_vision_encoder": True,
        "clip.use_silu": True, "clip.vision.projection_dim": TINY.text.hidden,
        "clip.vision.embedding_length": v.hidden, "clip.vision.block_count": v.layers,
        "clip.vision.attention.head_count": v.heads, "clip.vision.feed_forward_length": v.ffn,
        "clip.vision.patch_size": 16, "clip.vision.image_size": 1024,
    }
    for key, value in expected_keys.items():
        assert field(reader, key) == value, key
    assert "clip.use_gelu" not in reader.metadata
    assert field(reader, "clip.vision.image_mean") == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # img_break is row 12 of the bf16 embedding, bit for bit, stored as F32.
    text = tensors(read_gguf(converted("F32")[0]))
    np.testing.assert_array_equal(t["v.token_embd.img_break"].data, text["token_embd.weight"].data[12])


@pytest.mark.parametrize("quant,matrix_type", [("F16", Q.F16), ("BF16", Q.BF16), ("Q8_0", Q.Q8_0)])
def test_direct_types_keep_norms_biases_patch_and_img_break_precise(converted, quant, matrix_type):
    text, mmproj = converted(quant, quant)
    t, m = tensors(read_gguf(text)), tensors(read_gguf(mmproj))
    assert t["blk.0.attn_q.weight"].tensor_type == matrix_type
    assert t["token_embd.weight"].tensor_type == matrix_type
    assert t["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert t["output_norm.weight"].tensor_type == Q.F32
    assert m["v.blk.0.ffn_up.weight"].tensor_type == matrix_type
    assert m["mm.1.bias"].tensor_type == Q.F32
    assert m["v.token_embd.img_break"].tensor_type == Q.F32
    assert m["v.blk.0.ln1.weight"].tensor_type == Q.F32
    assert m["v.patch_embd.weight"].tensor_type == (Q.F16 if quant == "F16" else Q.F32)


def test_q8_0_is_gguf_py_quantization_of_the_source(converted):
    f32 = tensors(read_gguf(converted("F32")[0]))["blk.0.ffn_up.weight"].data
    q8 = tensors(read_gguf(converted("Q8_0")[0]))["blk.0.ffn_up.weight"]
    back = gguf.quants.dequantize(q8.data.reshape(f32.shape[0], -1), Q.Q8_0)
    assert np.abs(back - f32).max() <= np.abs(f32).max() / 127 + 1e-6


def test_k_quant_mix_in_one_pass(converted, tmp_path):
    text, _ = converted("Q4_K_M")
    reader = read_gguf(text)
    types = {name: t.type for name, t in reader.tensors.items()}
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert types["blk.0.ffn_gate.weight"] == Q.Q4_K
    assert types["output.weight"] == Q.Q6_K  # the mix keeps the output layer in Q6_K
    assert types["blk.0.attn_norm.weight"] == Q.F32
    leftovers = [p.name for p in text.parent.iterdir() if p.name not in (text.name, converted("Q4_K_M")[1].name)]
    assert leftovers == [], "no partial files may be left behind"


def test_dry_run_plan_writes_nothing(tiny_hf, tmp_path):
    plan = plan_conversion(ConvertOptions(source=tiny_hf, output_dir=tmp_path / "out", quant="Q4_K_M"))
    assert plan.layout == "hf"
    assert plan.text_tensors == 3 + TINY.text.layers * 9
    assert plan.mmproj_tensors == 2 + TINY.vision.layers * 9 + 5
    assert plan.disk_needed > plan.text_bytes + plan.mmproj_bytes
    text = plan.describe()
    assert "Q4_K_M" in text and "disk needed" in text
    assert not (tmp_path / "out").exists()


def test_plan_knows_the_exact_size_of_a_mix(converted, tiny_native, tmp_path):
    """Types are chosen per tensor before writing, so the plan's size is the file's, not an estimate."""
    plan = plan_conversion(ConvertOptions(source=tiny_native, output_dir=tmp_path, quant="Q4_K_M"))
    header = read_gguf_header(converted("Q4_K_M")[0])
    assert plan.text_bytes == sum(t.nbytes for t in header.tensors.values())


def test_output_names_tell_model_kind_and_quant(converted):
    text, mmproj = converted("Q8_0", "F16")
    assert text.name == "Pixtral-tiny-Q8_0.gguf"
    assert mmproj.name == "mmproj-Pixtral-tiny-F16.gguf"


def test_context_length_override(tiny_native, tmp_path):
    result = convert_checkpoint(ConvertOptions(source=tiny_native, output_dir=tmp_path, quant="BF16",
                                               context_length=32768))
    assert field(read_gguf(result.text_path), "llama.context_length") == 32768


def test_transformers5_style_config(tmp_path, tiny_hf):
    """transformers 5 nests rope_theta in rope_parameters and writes `dtype`; both styles parse the same."""
    old = parse_config_json(tiny_hf / "config.json")
    data = json.loads((tiny_hf / "config.json").read_text())
    for section in ("text_config", "vision_config"):
        theta = data[section].pop("rope_theta")
        data[section]["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    data["dtype"] = data.pop("torch_dtype")
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert parse_config_json(tmp_path / "config.json") == old


def test_sparse_config_takes_transformers_defaults(tmp_path):
    """The community config omits the vision tower's width and depth: the class defaults are the 12B's."""
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 10,
        "projector_hidden_act": "gelu", "torch_dtype": "bfloat16",
        "text_config": {"model_type": "mistral", "hidden_size": 5120, "head_dim": 128, "num_hidden_layers": 40,
                        "max_position_embeddings": 1024000, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
                        "vocab_size": 131072},
        "vision_config": {"model_type": "pixtral", "hidden_act": "silu", "head_dim": 64, "rope_theta": 10000.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    parsed = parse_config_json(tmp_path / "config.json")
    assert (parsed.vision.hidden_size, parsed.vision.num_layers, parsed.vision.num_heads) == (1024, 24, 16)
    assert (parsed.text.num_heads, parsed.text.num_kv_heads, parsed.text.ffn_size) == (32, 8, 14336)
    assert parsed.text.rope_theta == 1e9 and parsed.vision.adapter_bias is True
