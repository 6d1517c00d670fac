"""Bad input: a clear error naming the problem, and no file left behind."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from pixtral_cpp.convert import ConvertOptions, convert_checkpoint
from pixtral_cpp.convert.progress import NullProgress
from pixtral_cpp.errors import (
    CheckpointError,
    ConfigError,
    OutputError,
    QuantizationError,
    TensorError,
    TokenizerError,
    UnsupportedCheckpointError,
)


@pytest.fixture
def native_copy(tiny_native: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(tiny_native, folder)
    return folder


def _convert(source: Path, out: Path, **kw) -> None:
    convert_checkpoint(ConvertOptions(source=source, output_dir=out, quant=kw.pop("quant", "F32"),
                                      mmproj_quant="F32", **kw))


def assert_no_output(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == [], f"left behind: {list(out.iterdir())}"


def _rewrite_header(path: Path, edit, extra_data: bytes = b"") -> None:
    """Rewrite a safetensors header in place, keeping the data bytes (and appending `extra_data`)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:] + extra_data)


def _drop_tensor(path: Path, name: str) -> None:
    """Remove a tensor and its bytes, as a checkpoint written without it would be."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    begin, end = header.pop(name)["data_offsets"]
    for entry in header.values():
        if "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [offset - (end - begin) for offset in entry["data_offsets"]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[:begin] + data[end:])


def _data_size(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return path.stat().st_size - 8 - n


def test_missing_tokenizer(native_copy, tmp_path):
    (native_copy / "tekken.json").unlink()
    with pytest.raises(TokenizerError, match=r"tekken\.json.*tokenizer\.json|tokenizer\.json.*tekken\.json"):
        _convert(native_copy, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_truncated_safetensors(native_copy, tmp_path):
    weights = native_copy / "consolidated.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(TensorError, match=r"consolidated\.safetensors: truncated: tensor '.*'"):
        _convert(native_copy, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_corrupt_safetensors_header(native_copy, tmp_path):
    weights = native_copy / "consolidated.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[8:16] = b"\xff\xfe{not j"
    weights.write_bytes(bytes(blob))
    with pytest.raises(TensorError, match="corrupt safetensors header"):
        _convert(native_copy, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_not_a_safetensors_file(native_copy, tmp_path):
    (native_copy / "consolidated.safetensors").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(TensorError, match="not a safetensors file"):
        _convert(native_copy, tmp_path / "out")


def test_unknown_tensor(native_copy, tmp_path):
    weights = native_copy / "consolidated.safetensors"
    end = _data_size(weights)

    def add_unknown(header):
        header["layers.0.attention.wq.bias"] = {"dtype": "F32", "shape": [4], "data_offsets": [end, end + 16]}

    _rewrite_header(weights, add_unknown, extra_data=bytes(16))
    with pytest.raises(TensorError, match=r"unknown tensor.*layers\.0\.attention\.wq\.bias"):
        _convert(native_copy, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_missing_tensor(native_copy, tmp_path):
    _drop_tensor(native_copy / "consolidated.safetensors", "layers.1.feed_forward.w2.weight")
    with pytest.raises(TensorError, match=r"'layers\.1\.feed_forward\.w2\.weight' \(for GGUF blk\.1\.ffn_down"):
        _convert(native_copy, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_wrong_shape(native_copy, tmp_path):
    params = json.loads((native_copy / "params.json").read_text())
    params["hidden_dim"] *= 2  # the config no longer matches the FFN weights
    (native_copy / "params.json").write_text(json.dumps(params))
    with pytest.raises(TensorError, match=r"feed_forward\.w1\.weight' has shape \[\d+, \d+\], expected"):
        _convert(native_copy, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_text_only_mistral_is_not_pixtral(native_copy, tmp_path):
    params = json.loads((native_copy / "params.json").read_text())
    del params["vision_encoder"]
    (native_copy / "params.json").write_text(json.dumps(params))
    with pytest.raises(UnsupportedCheckpointError, match="not Pixtral"):
        _convert(native_copy, tmp_path / "out")


def test_other_llava_is_not_pixtral(tiny_hf, tmp_path):
    folder = tmp_path / "llava"
    shutil.copytree(tiny_hf, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["model_type"] = "clip_vision_model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointError, match="expected 'pixtral'"):
        _convert(folder, tmp_path / "out")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(UnsupportedCheckpointError, match=r"no Pixtral checkpoint found.*notes\.txt"):
        _convert(tmp_path / "empty", tmp_path / "out")


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        _convert(tmp_path / "nope" / "x", tmp_path / "out")


def test_vocabulary_and_config_disagree(native_copy, tmp_path):
    params = json.loads((native_copy / "params.json").read_text())
    params["vocab_size"] = 32768
    (native_copy / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="tokenizer has 131072 tokens but the config says vocab_size 32768"):
        _convert(native_copy, tmp_path / "out")


def test_existing_output_is_not_overwritten(tiny_native, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    precious = out / "Pixtral-tiny-F32.gguf"
    precious.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists.*--force"):
        _convert(tiny_native, out)
    assert precious.read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["Pixtral-tiny-F32.gguf"]
    _convert(tiny_native, out, force=True)
    assert precious.stat().st_size > 1000


def test_unwritable_output_folder(tiny_native, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="cannot write to output folder"):
        _convert(tiny_native, blocker / "models")


@pytest.mark.parametrize("quant,message", [
    ("Q4_K_X", "unknown text model quantization 'Q4_K_X'"),
    ("IQ2_XXS", "needs an importance matrix"),
])
def test_bad_quant_type(tiny_native, tmp_path, quant, message):
    with pytest.raises(QuantizationError, match=message):
        _convert(tiny_native, tmp_path / "out", quant=quant)
    assert_no_output(tmp_path / "out")


def test_bad_mmproj_quant_type(tiny_native, tmp_path):
    with pytest.raises(QuantizationError, match="unknown mmproj quantization 'Q4_K_M'"):
        convert_checkpoint(ConvertOptions(source=tiny_native, output_dir=tmp_path, mmproj_quant="Q4_K_M"))


class _InterruptAfter(NullProgress):
    """Simulates Ctrl-C part-way through writing."""

    def __init__(self, label_part: str) -> None:
        self.label_part, self.active, self.seen = label_part, False, 0

    def begin(self, label: str, total: int, unit: str = "bytes") -> None:
        self.active = self.label_part in label

    def advance(self, amount: int) -> None:
        self.seen += 1
        if self.active and self.seen > 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize("quant,stage", [("F32", "text model"), ("Q4_K_M", "text model (Q4_K_M)"), ("F32", "mmproj")])
def test_interrupted_conversion_leaves_nothing_that_looks_finished(tiny_native, tmp_path, quant, stage):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(ConvertOptions(source=tiny_native, output_dir=out, quant=quant), _InterruptAfter(stage))
    # the pair is published together: an interrupted run leaves neither file, nor anything partial
    assert list(out.iterdir()) == []


def test_not_enough_disk_space(tiny_native, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match=r"conversion needs .* GB|conversion needs .* MB"):
        _convert(tiny_native, tmp_path / "out")
    assert_no_output(tmp_path / "out")
