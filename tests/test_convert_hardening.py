"""Checkpoints whose GGUF llama.cpp would abort on are refused before a byte is written, in both layouts;
index and tokenizer files are not trusted; an interrupted or disk-full conversion leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pixtral_cpp.convert import ConvertOptions, NullProgress, convert_checkpoint
from pixtral_cpp.errors import ConfigError, OutputError, TensorError, TokenizerError

# Written into the JSON as the literal text 1e999, which Python's json reads as inf.
HUGE_LITERAL = "__1e999__"

# rule -> (params.json key path, config.json key path); the text values live at the top of params.json.
TEXT_KEYS = {
    "norm_eps": ("norm_eps", "text_config.rms_norm_eps"),
    "rope_theta": ("rope_theta", "text_config.rope_theta"),
    "heads": ("n_heads", "text_config.num_attention_heads"),
    "kv_heads": ("n_kv_heads", "text_config.num_key_value_heads"),
    "hidden": ("dim", "text_config.hidden_size"),
    "layers": ("n_layers", "text_config.num_hidden_layers"),
    "ffn": ("hidden_dim", "text_config.intermediate_size"),
    "vocab": ("vocab_size", "text_config.vocab_size"),
    "head_dim": ("head_dim", "text_config.head_dim"),
}
VISION_KEYS = {
    "heads": "num_attention_heads", "hidden": "hidden_size", "layers": "num_hidden_layers",
    "ffn": "intermediate_size", "patch": "patch_size", "image": "image_size", "rope_theta": "rope_theta",
    "norm_eps": "layer_norm_eps", "channels": "num_channels",
}
NOT_POSITIVE = [0, -1.0e-5, -0.0, 0.0, math.nan, math.inf, -math.inf, HUGE_LITERAL, 1e-50, 1e39, True, "1e-5"]
BAD_COUNTS = [0, -4, 2.0, True, "4", HUGE_LITERAL, 2**40, [4]]
# (rule, values) for the text model; every value must be refused with the key named.
TEXT_CASES = [("norm_eps", v) for v in NOT_POSITIVE] + [("rope_theta", v) for v in NOT_POSITIVE] + [
    (rule, v) for rule in ("heads", "kv_heads", "hidden", "layers", "ffn", "vocab", "head_dim") for v in BAD_COUNTS
] + [("kv_heads", 3), ("kv_heads", 16), ("head_dim", 63)]
VISION_RULES = ("heads", "hidden", "layers", "ffn", "patch", "image")
VISION_CASES = [(rule, v) for rule in VISION_RULES for v in BAD_COUNTS[:4]] + [
    ("heads", 3), ("heads", 512), ("patch", 24), ("patch", 2048), ("channels", 1), ("channels", 0),
    ("rope_theta", 0), ("rope_theta", -10000.0), ("rope_theta", math.nan), ("rope_theta", math.inf),
    ("rope_theta", 20000.0), ("norm_eps", 0), ("norm_eps", -1e-5), ("norm_eps", math.nan),
    ("norm_eps", HUGE_LITERAL), ("norm_eps", 1e-50), ("norm_eps", "1e-5"),
]


def linked_copy(source: Path, dest: Path, copied: tuple[str, ...]) -> Path:
    """The checkpoint with `copied` files copied (to be edited) and every other file linked (fast)."""
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.name in copied:
            (dest / item.name).write_bytes(item.read_bytes())
        else:
            (dest / item.name).symlink_to(item)
    return dest


def edit_json(path: Path, key_path: str, value: Any) -> None:
    """Set (or, for None, delete) a dotted key; HUGE_LITERAL becomes the number 1e999."""
    data = json.loads(path.read_text())
    *parents, leaf = key_path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    text = json.dumps(data, allow_nan=True).replace(f'"{HUGE_LITERAL}"', "1e999")
    path.write_text(text)


def assert_nothing_written(out: Path) -> None:
    """No GGUF, no hidden .partial, not even a probe: the refusal came before the output folder was touched."""
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert leftovers == [], f"left behind: {leftovers}"


def assert_one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and len(message) < 400, message


def convert(source: Path, out: Path, **options: Any) -> None:
    options.setdefault("quant", "F32")
    convert_checkpoint(ConvertOptions(source=source, output_dir=out, mmproj_quant="F32", **options))


def expect_config_error(folder: Path, config_name: str, key_path: str, tmp_path: Path) -> str:
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as caught:
        convert(folder, out)
    message = str(caught.value)
    assert config_name in message and key_path.split(".")[-1] in message, message
    assert_one_line(message)
    assert_nothing_written(out)
    return message


def value_text(value: Any) -> str:
    """How the refused value appears in the message."""
    return "inf" if value == HUGE_LITERAL else repr(value)


# ------------------------------------------------------------------------------------ config rules


@pytest.mark.parametrize("layout", ["native", "hf"])
@pytest.mark.parametrize("rule,value", TEXT_CASES, ids=[f"{r}={v!r}" for r, v in TEXT_CASES])
def test_text_config_rules(tiny_native, tiny_hf, tmp_path, layout, rule, value):
    source = tiny_native if layout == "native" else tiny_hf
    assert_config_edit_refused(source, layout, TEXT_KEYS[rule][layout == "hf"], value, tmp_path)


@pytest.mark.parametrize("layout", ["native", "hf"])
@pytest.mark.parametrize("rule,value", VISION_CASES, ids=[f"{r}={v!r}" for r, v in VISION_CASES])
def test_vision_config_rules(tiny_native, tiny_hf, tmp_path, layout, rule, value):
    source = tiny_native if layout == "native" else tiny_hf
    key_path = ("vision_encoder." if layout == "native" else "vision_config.") + VISION_KEYS[rule]
    assert_config_edit_refused(source, layout, key_path, value, tmp_path)


def assert_config_edit_refused(source, layout: str, key_path: str, value: Any, tmp_path: Path) -> None:
    """`value` written at `key_path` of the layout's config file is refused, naming the key and the value."""
    name = "params.json" if layout == "native" else "config.json"
    folder = linked_copy(source, tmp_path / "src", (name,))
    edit_json(folder / name, key_path, value)
    message = expect_config_error(folder, name, key_path, tmp_path)
    if not isinstance(value, (list, str)):
        assert value_text(value) in message or str(value) in message, message


@pytest.mark.parametrize("layout", ["native", "hf"])
@pytest.mark.parametrize("heads", [0, 3], ids=["zero-heads", "heads-not-dividing"])
def test_implied_head_dim_needs_heads_dividing_the_width(tiny_native, tiny_hf, tmp_path, layout, heads):
    """Without head_dim, width / heads is used: zero heads was a ZeroDivisionError traceback."""
    name = "params.json" if layout == "native" else "config.json"
    folder = linked_copy(tiny_native if layout == "native" else tiny_hf, tmp_path / "src", (name,))
    prefix = "" if layout == "native" else "text_config."
    heads_key = TEXT_KEYS["heads"][layout == "hf"]
    edit_json(folder / name, prefix + "head_dim", None)
    edit_json(folder / name, heads_key, heads)
    message = expect_config_error(folder, name, heads_key, tmp_path)
    assert ("not a multiple" in message) == (heads == 3), message


def test_nested_rope_theta_of_transformers5_is_checked(tiny_hf, tmp_path):
    folder = linked_copy(tiny_hf, tmp_path / "src", ("config.json",))
    edit_json(folder / "config.json", "text_config.rope_theta", None)
    edit_json(folder / "config.json", "text_config.rope_parameters", {"rope_theta": -1.0, "rope_type": "default"})
    expect_config_error(folder, "config.json", "rope_theta", tmp_path)


def test_context_length_override_is_checked(tiny_native, tmp_path):
    with pytest.raises(ConfigError, match=r"context length.*positive integer.*got 0"):
        convert(tiny_native, tmp_path / "out", context_length=0)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("layout", ["native", "hf"])
@pytest.mark.parametrize("text", ['{"a": ' * 100_000, '{"dim": 1, "dim": 2}', "[1, 2]", "9" * 5000, "\udcff"],
                         ids=["deep", "repeated-key", "not-object", "5000-digits", "not-utf8"])
def test_unparseable_config_file(tiny_native, tiny_hf, tmp_path, layout, text):
    name = "params.json" if layout == "native" else "config.json"
    folder = linked_copy(tiny_native if layout == "native" else tiny_hf, tmp_path / "src", (name,))
    (folder / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=name) as caught:
        convert(folder, tmp_path / "out")
    assert_one_line(str(caught.value))
    assert_nothing_written(tmp_path / "out")


def test_architectures_of_the_wrong_type(tiny_hf, tmp_path):
    folder = linked_copy(tiny_hf, tmp_path / "src", ("config.json",))
    edit_json(folder / "config.json", "architectures", 7)
    expect_config_error(folder, "config.json", "architectures", tmp_path)


# ----------------------------------------------------------------------- safetensors, end to end


def test_corrupt_offsets_stop_conversion_before_writing(tiny_native, tmp_path):
    """The issue's string offsets and 1e999 dimension, through the whole converter (the reader's own cases are
    in test_safetensors_fuzz.py)."""
    import struct

    folder = linked_copy(tiny_native, tmp_path / "src", ("consolidated.safetensors",))
    weights = folder / "consolidated.safetensors"
    blob = weights.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    header["norm.weight"]["data_offsets"] = [str(o) for o in header["norm.weight"]["data_offsets"]]
    header["output.weight"]["shape"][0] = HUGE_LITERAL
    raw = json.dumps(header).replace(f'"{HUGE_LITERAL}"', "1e999").encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + length:])
    with pytest.raises(TensorError, match=r"consolidated\.safetensors: tensor '(norm|output)\.weight' has") as caught:
        convert(folder, tmp_path / "out")
    assert_one_line(str(caught.value))
    assert_nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------------- shard index


INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize("shard", [
    "../../etc/passwd", "/etc/passwd", "../Pixtral-tiny/model-00001-of-00002.safetensors",
    "sub/model-00001-of-00002.safetensors", "tokenizer.json", "", ".model.safetensors", "a\x00.safetensors", 5,
    None, ["model-00001-of-00002.safetensors"],
])
def test_index_pointing_outside_the_folder_is_refused(tiny_hf, tmp_path, shard):
    folder = linked_copy(tiny_hf, tmp_path / "src", (INDEX,))
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["language_model.model.norm.weight"] = shard
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"weight_map\['language_model\.model\.norm\.weight'\].*inside the "
                                          r"checkpoint folder") as caught:
        convert(folder, tmp_path / "out")
    assert_one_line(str(caught.value))
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("weight_map", [[], {}, "model.safetensors", None], ids=["list", "empty", "string", "null"])
def test_index_without_a_weight_map_object(tiny_hf, tmp_path, weight_map):
    folder = linked_copy(tiny_hf, tmp_path / "src", (INDEX,))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"index\.json: no 'weight_map' object"):
        convert(folder, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_index_that_is_not_json(tiny_hf, tmp_path):
    folder = linked_copy(tiny_hf, tmp_path / "src", (INDEX,))
    (folder / INDEX).write_text('{"weight_map": ' * 50_000)
    with pytest.raises(ConfigError, match=r"index\.json: JSON nested too deeply|index\.json: not valid JSON"):
        convert(folder, tmp_path / "out")


def test_index_naming_a_missing_shard(tiny_hf, tmp_path):
    folder = linked_copy(tiny_hf, tmp_path / "src", (INDEX,))
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["language_model.model.norm.weight"] = "model-00003-of-00003.safetensors"
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(TensorError, match="missing: model-00003-of-00003.safetensors"):
        convert(folder, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_index_naming_the_wrong_shard(tiny_hf, tmp_path):
    folder = linked_copy(tiny_hf, tmp_path / "src", (INDEX,))
    index = json.loads((folder / INDEX).read_text())
    name = "language_model.lm_head.weight"
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(TensorError, match=r"lists tensor 'language_model\.lm_head\.weight' in .*does not hold it"):
        convert(folder, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------- tokenizer files


TEKKEN_EDITS = {
    "huge vocab size": (("config", "default_vocab_size"), 10**12, "not a real vocabulary"),
    "huge special count": (("config", "default_num_special_tokens"), 10**9, "between 0 and"),
    "negative special count": (("config", "default_num_special_tokens"), -5, "between 0 and"),
    "vocab size a float": (("config", "default_vocab_size"), 131072.0, "default_vocab_size' must be int"),
    "vocab not a list": (("vocab",), {"a": 1}, "key 'vocab' must be list"),
    "config not an object": (("config",), [1], "key 'config' must be dict"),
    "rank a bool": (("vocab", 0, "rank"), False, r"vocab\[0\]\.rank' must be int"),
    "giant token": (("vocab", 300, "token_bytes"), "QUFB" * 2000, "6000 bytes long"),
    "special tokens not a list": (("special_tokens",), "x", "'special_tokens' must be a list"),
}


TOKENIZER_JSON_EDITS = {
    "vocab a list": (("model", "vocab"), ["a"], "model.vocab' must be dict"),
    "id a bool": (("model", "vocab", "!"), True, "must be a unique integer id, got True"),
    "id a float": (("model", "vocab", "!"), 3.0, "must be a unique integer id, got 3.0"),
    "merges a string": (("model", "merges"), "a b", "model.merges' must be list"),
    "merge a number": (("model", "merges", 0), 7, "entry 7 is neither"),
    "added tokens an object": (("added_tokens",), {"id": 0}, "'added_tokens' must be a list"),
    "added id a string": (("added_tokens", 0, "id"), "0", r"added_tokens\[\]\.id' must be int"),
    "not BPE": (("model", "type"), ["BPE"], "only byte-level BPE"),
}


TOKENIZER_FILE_EDITS = [("tiny_native", "tekken.json", name, edit) for name, edit in TEKKEN_EDITS.items()] + [
    ("tiny_hf", "tokenizer.json", name, edit) for name, edit in TOKENIZER_JSON_EDITS.items()]


@pytest.mark.parametrize(("checkpoint", "file", "case", "edit"), TOKENIZER_FILE_EDITS,
                         ids=[f"{file}: {case}" for _, file, case, _ in TOKENIZER_FILE_EDITS])
def test_corrupt_tokenizer_file(request, tmp_path, checkpoint, file, case, edit):
    (*parents, leaf), value, expected = edit
    folder = linked_copy(request.getfixturevalue(checkpoint), tmp_path / "src", (file,))
    data = json.loads((folder / file).read_text())
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value
    (folder / file).write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=expected) as caught:
        convert(folder, tmp_path / "out")
    assert file in str(caught.value)
    assert_one_line(str(caught.value))
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("name,layout", [("tekken.json", "native"), ("tokenizer.json", "hf")])
@pytest.mark.parametrize("text", ["[" * 100_000, "9" * 5000, '"just a string"', "\udcff"],
                         ids=["deep", "5000-digits", "not-object", "not-utf8"])
def test_unparseable_tokenizer_file(tiny_native, tiny_hf, tmp_path, name, layout, text):
    folder = linked_copy(tiny_native if layout == "native" else tiny_hf, tmp_path / "src", (name,))
    (folder / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(TokenizerError, match=name) as caught:
        convert(folder, tmp_path / "out")
    assert_one_line(str(caught.value))


# --------------------------------------------------------------------- interrupted and full disks


class StopAt(NullProgress):
    """Raises `error` at one point of the run, as Ctrl-C or SIGTERM (turned into KeyboardInterrupt by the
    CLI) or a sys.exit() in a caller's callback would."""

    def __init__(self, label_part: str, when: str, error: type[BaseException]) -> None:
        self.label_part, self.when, self.error = label_part, when, error
        self.active, self.chunks = False, 0

    def begin(self, label: str, total: int, unit: str = "bytes") -> None:
        self.active = self.label_part in label
        if self.active and self.when == "begin":
            raise self.error

    def advance(self, amount: int) -> None:
        self.chunks += self.active
        if self.active and self.when == "advance" and self.chunks == 2:
            raise self.error

    def end(self) -> None:
        if self.active and self.when == "end":  # the file is complete, not yet published
            raise self.error


INTERRUPTIONS = [("mmproj", "advance", "F32"), ("text model", "begin", "F32"), ("text model", "advance", "Q8_0"),
                 ("text model", "end", "Q8_0")]


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("label,when,quant", INTERRUPTIONS, ids=[f"{a}-{b}-{c}" for a, b, c in INTERRUPTIONS])
def test_interrupted_conversion_leaves_no_partial_files(tiny_native, tmp_path, error, label, when, quant):
    out = tmp_path / "out"
    progress = StopAt(label, when, error)
    with pytest.raises(error):
        convert_checkpoint(ConvertOptions(source=tiny_native, output_dir=out, quant=quant, mmproj_quant="F32"),
                           progress)
    assert progress.active, "the interruption point was never reached"
    assert list(out.iterdir()) == []


def test_failed_publish_takes_back_the_text_model(tiny_native, tmp_path):
    """The mmproj cannot be renamed into place (a folder is in the way): the text model, already renamed,
    is removed again, so no new text model stands beside a missing or old mmproj."""
    out = tmp_path / "out"
    blocker = out / "mmproj-Pixtral-tiny-F32.gguf"
    (blocker / "keep").mkdir(parents=True)
    with pytest.raises(OutputError, match="writing the output in .* failed") as caught:
        convert(tiny_native, out, force=True)
    assert_one_line(str(caught.value))
    assert sorted(p.name for p in out.iterdir()) == [blocker.name]


FILE_SIZE_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    from pixtral_cpp.convert import ConvertOptions, convert_checkpoint
    from pixtral_cpp.errors import PixtralError

    # With SIGXFSZ ignored, a write past the limit fails with EFBIG, as on a full disk or a FAT32 stick.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        convert_checkpoint(ConvertOptions(source=sys.argv[1], output_dir=sys.argv[2], quant="F32",
                                          mmproj_quant="F32"))
    except PixtralError as error:
        print(f"{type(error).__name__}: {error}")
        sys.exit(3)
""")


@pytest.mark.parametrize("limit_mb", [1, 24], ids=["in-mmproj", "in-text-model"])
def test_file_size_limit_mid_write(tiny_native, tmp_path, limit_mb):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(tiny_native), str(out),
                          str(limit_mb * 1024 * 1024)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 3, run.stdout + run.stderr
    assert run.stdout.startswith("OutputError: ") and "too large" in run.stdout, run.stdout
    assert run.stdout.count("\n") == 1 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert list(out.iterdir()) == []


TERMINATED_DURING = textwrap.dedent("""
    import os, signal, sys, threading
    from pixtral_cpp.convert import ConvertOptions, NullProgress, convert_checkpoint

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt  # what the CLI does with SIGTERM

    signal.signal(signal.SIGTERM, on_sigterm)

    class TerminateDuring(NullProgress):
        def begin(self, label, total, unit="bytes"):
            if sys.argv[3] in label:  # a real signal, arriving while this file is being written
                threading.Timer(float(sys.argv[4]), os.kill, (os.getpid(), signal.SIGTERM)).start()

    try:
        convert_checkpoint(ConvertOptions(source=sys.argv[1], output_dir=sys.argv[2], quant="Q8_0",
                                          mmproj_quant="F32"), TerminateDuring())
    except KeyboardInterrupt:
        sys.exit(130)
    print("finished before the signal")
""")


@pytest.mark.parametrize("label,delay", [("mmproj", 0.01), ("text model", 0.05), ("text model", 0.3)])
def test_sigterm_mid_conversion_leaves_no_partial_files(tiny_native, tmp_path, label, delay):
    """A real SIGTERM lands wherever the run is, the quantizer threads' work included."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", TERMINATED_DURING, str(tiny_native), str(out), label, str(delay)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 130, run.stdout + run.stderr
    assert list(out.iterdir()) == []


LAYER_COUNT_GUARDED = textwrap.dedent("""
    import resource, sys
    from pixtral_cpp.convert import ConvertOptions, plan_conversion
    from pixtral_cpp.errors import TensorError

    # A regression would build billions of table rows; fail with MemoryError here, not the machine.
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
    try:
        plan_conversion(ConvertOptions(source=sys.argv[1], output_dir=sys.argv[2]))
    except TensorError as error:
        print(error)
        sys.exit(3)
""")


@pytest.mark.parametrize("key_path", ["n_layers", "vision_encoder.num_hidden_layers"])
def test_billions_of_layers_fail_at_the_first_missing_tensor(tiny_native, tmp_path, key_path):
    """A layer count that fits GGUF's uint32 but not the weights: refused as a missing tensor, in bounded memory."""
    folder = linked_copy(tiny_native, tmp_path / "src", ("params.json",))
    edit_json(folder / "params.json", key_path, 4_000_000_000)
    run = subprocess.run([sys.executable, "-c", LAYER_COUNT_GUARDED, str(folder), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "is missing from the checkpoint" in run.stdout, run.stdout + run.stderr[-2000:]
