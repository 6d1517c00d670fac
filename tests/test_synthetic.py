"""The synthetic checkpoint generator: determinism, layout equivalence, scaling, configs, transformers."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pixtral_cpp.errors import ConfigError, OutputError, TensorError, TokenizerError
from pixtral_cpp.synthetic import (
    SHAPES,
    canonical_tensor_names,
    expected_tensor_count,
    float32_to_bfloat16_bits,
    hf_name,
    write_synthetic_checkpoint,
)
from pixtral_cpp.synthetic.configs import MISTRAL_DEFAULTS, PIXTRAL_VISION_DEFAULTS, hf_config
from pixtral_cpp.synthetic.names import plan_tensors
from pixtral_cpp.synthetic.safetensors_writer import SafetensorsStreamWriter, TensorEntry
from pixtral_cpp.synthetic.weights import split_into_shards

TINY = SHAPES["tiny"]
SEED = 7
TEKKEN_ONLY = ("tekken.json",)  # tokenizer.json needs tekken.py; tested separately


def _write(path: Path, **kwargs) -> Path:
    kwargs.setdefault("hf_tokenizer_files", TEKKEN_ONLY)
    return write_synthetic_checkpoint(path, shape="tiny", **kwargs)


@pytest.fixture(scope="session")
def native_dir(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("syn") / "native", layout="native", seed=SEED)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("syn") / "hf", layout="hf", seed=SEED)


@pytest.fixture(scope="session")
def native(native_dir) -> dict[str, torch.Tensor]:
    return load_file(native_dir / "consolidated.safetensors")


def _load_hf(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("model*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unpermute_from_hf(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    # docs/gguf-layout.md §3.1: inside each head, native row 2i + j = HF row j * d/2 + i.
    rows, columns = weight.shape
    return weight.reshape(rows // head_dim, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def _rope_head_dim(native_name: str) -> int | None:
    if native_name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return TINY.vision.head_dim if native_name.startswith("vision_encoder.") else TINY.text.head_dim
    return None


def assert_no_temp_files(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# --- names and shapes -------------------------------------------------------------------------------


def test_presets_follow_the_real_model():
    full, tiny = SHAPES["full"], SHAPES["tiny"]
    assert (full.text.hidden, full.text.layers, full.text.heads, full.text.kv_heads) == (5120, 40, 32, 8)
    assert (full.text.head_dim, full.text.ffn, full.vision.head_dim) == (128, 14336, 64)
    assert (full.vision.hidden, full.vision.layers, full.vision.ffn) == (1024, 24, 4096)
    assert tiny.text.head_dim != tiny.text.hidden // tiny.text.heads  # exercises key_length like the real one
    # 363 text tensors + 222 mmproj tensors (the 223rd, img_break, is cut from the embedding).
    assert expected_tensor_count(full) == 585


@pytest.mark.parametrize("shape", ["tiny", "full"])
def test_tensor_names_are_unique_and_map_one_to_one(shape):
    names = canonical_tensor_names(SHAPES[shape])
    assert len(names) == len(set(names)) == expected_tensor_count(SHAPES[shape])
    for prefixes in ("legacy", "current"):
        assert len({hf_name(name, prefixes) for name in names}) == len(names)


def test_hf_names_use_the_requested_prefixes():
    assert hf_name("layers.3.attention.wq.weight") == "language_model.model.layers.3.self_attn.q_proj.weight"
    assert hf_name("output.weight", "current") == "lm_head.weight"
    assert hf_name("vision_encoder.transformer.layers.1.feed_forward.w2.weight", "current") == (
        "model.vision_tower.transformer.layers.1.feed_forward.down_proj.weight")
    assert hf_name("vision_language_adapter.w_in.bias") == "multi_modal_projector.linear_1.bias"
    with pytest.raises(TensorError, match="layers.x"):
        hf_name("layers.x.attention.wq.weight")


# --- files ----------------------------------------------------------------------------------------------


def test_native_files_parse_and_hold_every_tensor(native_dir):
    assert sorted(p.name for p in native_dir.iterdir()) == ["consolidated.safetensors", "params.json",
                                                            "tekken.json"]
    with safe_open(native_dir / "consolidated.safetensors", "pt") as file:
        assert list(file.keys()) == sorted(canonical_tensor_names(TINY))
        assert file.metadata() == {"format": "pt"}
        assert file.get_slice("tok_embeddings.weight").get_shape() == [131072, 256]
        assert file.get_slice("tok_embeddings.weight").get_dtype() == "BF16"


def test_hf_files_parse_and_the_index_covers_every_tensor(hf_dir):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf_dir.glob("model-*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(index["weight_map"]) == sorted(hf_name(n) for n in canonical_tensor_names(TINY))
    for shard in shards:
        with safe_open(hf_dir / shard, "pt") as file:
            assert {n for n, s in index["weight_map"].items() if s == shard} == set(file.keys())
    sizes = sum(t.numel() * t.element_size() for t in _load_hf(hf_dir).values())
    assert index["metadata"]["total_size"] == sizes
    assert_no_temp_files(hf_dir)


def test_same_seed_same_bytes_other_seed_other_values(tmp_path):
    # The small tokenizer keeps the three writes fast (3840-row embeddings instead of 131072).
    first, again, other = (_write(tmp_path / name, layout="native", seed=seed, tokenizer="small")
                           / "consolidated.safetensors" for name, seed in [("a", 5), ("b", 5), ("c", 6)])
    assert _sha256(first) == _sha256(again)
    reference, different = load_file(first), load_file(other)
    for name, tensor in reference.items():
        assert not torch.equal(tensor, different[name]), name


def test_both_layouts_carry_the_same_weights(native, hf_dir):
    hf = _load_hf(hf_dir)
    assert len(hf) == len(native)
    for name, tensor in native.items():
        stored = hf[hf_name(name)]
        head_dim = _rope_head_dim(name)
        if head_dim is not None:
            assert not torch.equal(stored, tensor), f"{name} should be permuted in the HF layout"
            stored = _unpermute_from_hf(stored, head_dim)
        assert torch.equal(stored, tensor), name


def test_single_file_with_current_prefixes_holds_the_same_tensors(tmp_path, hf_dir):
    current = _write(tmp_path / "current", layout="hf", seed=SEED, hf_prefixes="current", hf_shards=1)
    assert not (current / "model.safetensors.index.json").exists()
    tensors = load_file(current / "model.safetensors")
    legacy = _load_hf(hf_dir)
    assert len(tensors) == len(legacy)
    for name in canonical_tensor_names(TINY):
        assert torch.equal(tensors[hf_name(name, "current")], legacy[hf_name(name, "legacy")]), name


def test_float32_checkpoint_rounds_to_the_bfloat16_one(tmp_path, native):
    f32 = load_file(_write(tmp_path / "f32", layout="native", seed=SEED, dtype="float32")
                    / "consolidated.safetensors")
    for name, tensor in native.items():
        assert f32[name].dtype == torch.float32
        assert torch.equal(f32[name].to(torch.bfloat16), tensor), name


def test_bfloat16_rounding_matches_torch():
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 3.4e38, 1 + 2**-8, 1 + 3 * 2**-8],
                        dtype=np.float32)
    values = np.concatenate([specials, np.random.default_rng(0).standard_normal(100_000, dtype=np.float32)])
    ours = float32_to_bfloat16_bits(values)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = np.isfinite(values) | np.isinf(values)
    np.testing.assert_array_equal(ours[finite], expected[finite])
    assert np.isnan((ours[~finite].astype(np.uint32) << 16).view(np.float32)).all()


# --- values -------------------------------------------------------------------------------------------


def test_weights_are_scaled_like_a_trained_model(native):
    for name, tensor in native.items():
        values = tensor.float()
        if values.ndim >= 2 and name != "tok_embeddings.weight":
            fan_in = math.prod(values.shape[1:])
            assert abs(values.std().item() * math.sqrt(fan_in) - 1) < 0.2, name
        elif name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            assert 0.6 <= values.min() and values.max() <= 1.4, name
            assert values.std() > 0.1, f"{name} is almost constant"
        elif name.endswith(".bias"):
            assert 0 < values.std() < 0.2, name
    embedding = native["tok_embeddings.weight"].float()
    assert abs(embedding.std().item() - 1) < 0.05
    img_break = embedding[12]  # copied into the mmproj as v.token_embd.img_break
    assert abs(img_break.std().item() - 1) < 0.2 and img_break.abs().min() < img_break.abs().max()


def _rotate_interleaved(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    d = x.shape[-1]
    angle = position * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
    return out


def _rotate_half(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    d = x.shape[-1]
    angle = np.tile(position * theta ** (-np.arange(0, d, 2) / d), 2)
    rotated = np.concatenate([-x[d // 2:], x[: d // 2]])
    return x * np.cos(angle) + rotated * np.sin(angle)


def test_hf_qk_give_the_native_attention_scores_under_hf_rope(native, hf_dir):
    """The permutation direction matters: HF rotate_half RoPE on HF q/k must equal native pair RoPE."""
    hf = _load_hf(hf_dir)
    d, x = TINY.text.head_dim, np.random.default_rng(1).standard_normal(TINY.text.hidden)
    names = ("layers.0.attention.wq.weight", "layers.0.attention.wk.weight")  # head 0 of each
    q_native, k_native = (native[name].double().numpy()[:d] @ x for name in names)
    q_hf, k_hf = (hf[hf_name(name)].double().numpy()[:d] @ x for name in names)
    for m, n in [(0, 5), (3, 17), (100, 2)]:
        score_native = _rotate_interleaved(q_native, m, 1e9) @ _rotate_interleaved(k_native, n, 1e9)
        score_hf = _rotate_half(q_hf, m, 1e9) @ _rotate_half(k_hf, n, 1e9)
        assert score_hf == pytest.approx(score_native, rel=1e-9)


# --- configs --------------------------------------------------------------------------------------------


def test_params_json_is_the_mistral_inference_format(native_dir):
    params = json.loads((native_dir / "params.json").read_text())
    assert params == {
        "dim": 256, "n_layers": 2, "head_dim": 64, "hidden_dim": 512, "n_heads": 8, "n_kv_heads": 2,
        "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": 131072,
        "vision_encoder": {"hidden_size": 256, "num_channels": 3, "image_size": 1024, "patch_size": 16,
                           "rope_theta": 10000.0, "intermediate_size": 512, "num_hidden_layers": 3,
                           "num_attention_heads": 4, "image_token_id": 10},
    }


def test_params_json_agrees_with_mistral_common(native_dir, native):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_file(str(native_dir / "tekken.json")).instruct_tokenizer.tokenizer
    params = json.loads((native_dir / "params.json").read_text())
    assert tokenizer.n_words == params["vocab_size"] == native["tok_embeddings.weight"].shape[0]
    assert tokenizer.get_special_token("[IMG]") == params["vision_encoder"]["image_token_id"]
    assert tokenizer.get_special_token("[IMG_BREAK]") == 12


def test_sparse_config_defaults_match_installed_transformers():
    from transformers import MistralConfig, PixtralVisionConfig

    for cls, defaults in [(MistralConfig, MISTRAL_DEFAULTS), (PixtralVisionConfig, PIXTRAL_VISION_DEFAULTS)]:
        fields = cls.__dataclass_fields__
        assert {key: fields[key].default for key in defaults} == defaults, cls.__name__


def test_sparse_hf_config_of_the_real_shape_reads_back_in_transformers():
    from transformers import LlavaConfig

    raw = hf_config(SHAPES["full"], "bfloat16", sparse=True)
    # As in mistral-community/pixtral-12b: values equal to the class defaults are simply absent.
    assert not {"num_attention_heads", "intermediate_size", "num_key_value_heads"} & set(raw["text_config"])
    assert set(raw["vision_config"]) == {"model_type", "head_dim", "hidden_act", "rope_theta"}
    config = LlavaConfig.from_dict(raw)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (5120, 40, 32)
    assert (text.head_dim, text.intermediate_size, text.num_key_value_heads) == (128, 14336, 8)
    assert (text.rope_parameters["rope_theta"], text.rms_norm_eps, text.sliding_window) == (1e9, 1e-5, None)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.hidden_act) == (1024, 24, "silu")
    assert vision.rope_parameters["rope_theta"] == 10000.0
    assert (config.image_token_index, config.vision_feature_layer) == (10, -1)


def test_dense_hf_config_lists_every_key(tmp_path):
    raw = hf_config(SHAPES["full"], "float32", sparse=False)
    assert raw["text_config"]["num_attention_heads"] == 32 and raw["vision_config"]["num_hidden_layers"] == 24
    assert raw["torch_dtype"] == "float32"


def test_hf_side_files(hf_dir):
    pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
    assert pre["patch_size"] == {"height": 16, "width": 16} and pre["image_mean"][0] == 0.48145466
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (hf_dir / "tekken.json").is_file() and not (hf_dir / "tokenizer.json").exists()


# --- transformers -----------------------------------------------------------------------------------------


def test_transformers_loads_the_old_style_checkpoint_and_runs(hf_dir):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True,
                                                                dtype=torch.float32)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    loaded = model.state_dict()
    legacy_to_current = {hf_name(n): hf_name(n, "current") for n in canonical_tensor_names(TINY)}
    for name, tensor in _load_hf(hf_dir).items():
        assert torch.equal(loaded[legacy_to_current[name]], tensor.float()), name
    # One 32x32 image = 2x2 patches: [IMG] [IMG] [IMG_BREAK] [IMG] [IMG] [IMG_END], inside [INST] ... [/INST].
    ids = torch.tensor([[1, 3, 10, 10, 12, 10, 10, 13, 1500, 1600, 4]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[32, 32]])).logits
    assert logits.shape == (1, 11, 131072) and torch.isfinite(logits).all()
    assert 0.1 < logits.std() < 10  # realistic scales, not vanishing activations


# --- writer and errors --------------------------------------------------------------------------------


def test_failed_write_leaves_neither_temp_nor_target(tmp_path):
    target = tmp_path / "x.safetensors"

    def broken_chunks():
        yield np.zeros(2, dtype=np.float32)
        raise RuntimeError("disk on fire")

    entries = [TensorEntry("a", "F32", (4,))]
    with pytest.raises(RuntimeError), SafetensorsStreamWriter(target, entries) as writer:
        writer.write_tensor("a", broken_chunks())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="got 8 bytes"), \
            SafetensorsStreamWriter(target, entries) as writer:
        writer.write_tensor("a", [np.zeros(2, dtype=np.float32)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shards", [2, 3, 17, 54])
def test_shards_are_consecutive_and_never_empty(shards):
    tensors = plan_tensors(TINY)
    groups = split_into_shards(tensors, shards, "bfloat16")
    assert len(groups) == shards and all(groups)
    assert [t for group in groups for t in group] == tensors


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": "huge"}, "unknown synthetic shape"),
    ({"layout": "gguf"}, "layout"),
    ({"layout": "hf", "hf_shards": 0}, "hf_shards"),
    ({"dtype": "float16"}, "dtype"),
    ({"layout": "hf", "hf_tokenizer_files": ("vocab.txt",)}, "tokenizer files"),
])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        write_synthetic_checkpoint(tmp_path, **kwargs)


def test_tokenizer_json_only_like_the_community_repo(tmp_path):
    out = write_synthetic_checkpoint(tmp_path / "hf", layout="hf", shape="tiny", tokenizer="small",
                                     hf_tokenizer_files=("tokenizer.json",))
    assert (out / "tokenizer.json").is_file() and not (out / "tekken.json").exists()


def test_small_tokenizer_sets_the_vocabulary(tmp_path):
    from pixtral_cpp.synthetic import tekken

    small = tmp_path / "small-tekken.json"
    tekken.write_small_tekken(small)
    vocab = json.loads(small.read_text())["config"]["default_vocab_size"]
    out = write_synthetic_checkpoint(tmp_path / "native", layout="native", shape="tiny", tokenizer="small")
    assert json.loads((out / "params.json").read_text())["vocab_size"] == vocab
    with safe_open(out / "consolidated.safetensors", "pt") as file:
        assert file.get_slice("output.weight").get_shape() == [vocab, 256]


def test_missing_tekken_file_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="nowhere.json"):
        write_synthetic_checkpoint(tmp_path, tokenizer=tmp_path / "nowhere.json")


def test_writer_refuses_an_incomplete_file(tmp_path):
    target = tmp_path / "x.safetensors"
    entries = [TensorEntry("a", "F32", (2,)), TensorEntry("b", "F32", (2,))]
    with pytest.raises(OutputError, match="'b'"), SafetensorsStreamWriter(target, entries) as writer:
        writer.write_tensor("a", [np.zeros(2, dtype=np.float32)])
    assert list(tmp_path.iterdir()) == []
