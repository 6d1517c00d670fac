"""What llama.cpp assumes about a Pixtral text GGUF and mmproj, checked from the header first.

llama.cpp trusts much of a GGUF's metadata: libmtmd reads every clip.* value with gguf's typed
getters, which abort the process on a value of another type; an RMS epsilon that is NaN or negative
fails `GGML_ASSERT(eps >= 0.0f)` in the first forward pass; a vision head count that does not divide
the width, or a patch size that does not match v.patch_embd.weight, fails a reshape assert while
the graph is built; libmtmd checks no tensor shape at all. Each such assumption is one row or one
small function here, so `info` can list the problems and check_pair refuses the files before any
of them reaches llama.cpp (sources: vendor/llama.cpp src/llama-model.cpp load_hparams,
src/models/llama.cpp, tools/mtmd/clip.cpp load_hparams and build_vit, ggml/src/gguf.cpp).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType

from pixtral_cpp.gguf_file import GGUFHeader

U32, I32, F32 = GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32
STR, BOOL, ARRAY = GGUFValueType.STRING, GGUFValueType.BOOL, GGUFValueType.ARRAY
LLAMA_MAX_LAYERS = 512  # llama-hparams.h; GGML_ASSERT(n_layer <= LLAMA_MAX_LAYERS)
CLIP_MAX_IMAGE_SIZE, CLIP_MAX_PATCH_SIZE = 8192, 65535  # clip.cpp load_hparams' sanity checks
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # anything else: GGML_ASSERT in load_hparams
_FIX = "re-convert or re-download it"
_MAX_SHAPE_PROBLEMS = 3  # one wrong hyper-parameter makes every layer's tensors wrong: name a few

Check = Callable[[Any], str | None]  # what is wrong with a value, or None


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def finite_positive(value: Any) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a finite positive number"


def at_most(limit: int) -> Check:
    return lambda value: None if 0 < value <= limit else f"must be between 1 and {limit}"


def zero(value: Any) -> str | None:
    return None if value == 0 else "must be 0 (Pixtral has no experts)"


def one_of(*allowed: Any) -> Check:
    return lambda value: None if value in allowed else f"must be one of {', '.join(map(str, allowed))}"


def true(value: Any) -> str | None:
    return None if value else "must be true"


def rgb_floats(positive_only: bool) -> Check:
    def check(values: list[float]) -> str | None:
        if len(values) < 3 or not all(math.isfinite(v) and (v > 0 or not positive_only) for v in values):
            return f"must hold 3 finite{' positive' if positive_only else ''} numbers"
        return None
    return check


def anything(_value: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Rule:
    """One metadata key llama.cpp reads: its GGUF type (item type for arrays) and what it must hold."""

    key: str
    type: GGUFValueType
    check: Check = anything
    required: bool = False
    item: GGUFValueType | None = None  # for ARRAY


def _required(key: str, vtype: GGUFValueType, check: Check = anything, item: GGUFValueType | None = None) -> Rule:
    return Rule(key, vtype, check, True, item)


# llama_model_loader refuses a mistyped key with an error; libmtmd (below) aborts instead.
TEXT_RULES = (
    _required("general.architecture", STR, one_of("llama")),
    Rule("general.name", STR),
    Rule("general.file_type", U32),
    _required("llama.context_length", U32, positive),
    _required("llama.embedding_length", U32, positive),
    _required("llama.block_count", U32, at_most(LLAMA_MAX_LAYERS)),
    _required("llama.feed_forward_length", U32, positive),
    _required("llama.attention.head_count", U32, positive),
    Rule("llama.attention.head_count_kv", U32, positive),
    Rule("llama.attention.key_length", U32, positive),
    Rule("llama.attention.value_length", U32, positive),
    Rule("llama.rope.dimension_count", U32, positive),
    Rule("llama.rope.freq_base", F32, finite_positive),
    _required("llama.attention.layer_norm_rms_epsilon", F32, finite_positive),
    Rule("llama.vocab_size", U32, positive),
    Rule("llama.expert_count", U32, zero),
    Rule("llama.expert_used_count", U32, zero),
    Rule("llama.rope.scaling.type", STR, one_of(*ROPE_SCALING_TYPES)),
    Rule("llama.rope.scaling.factor", F32, lambda v: None if math.isfinite(v) and v >= 0 else "must be finite"),
    _required("tokenizer.ggml.model", STR),
    Rule("tokenizer.ggml.pre", STR),
    _required("tokenizer.ggml.tokens", ARRAY, lambda v: None if v else "must not be empty", STR),
    Rule("tokenizer.ggml.scores", ARRAY, item=F32),
    Rule("tokenizer.ggml.token_type", ARRAY, item=I32),
    Rule("tokenizer.ggml.merges", ARRAY, item=STR),
    Rule("tokenizer.ggml.bos_token_id", U32),
    Rule("tokenizer.ggml.eos_token_id", U32),
    Rule("tokenizer.ggml.unknown_token_id", U32),
    Rule("tokenizer.ggml.padding_token_id", U32),
    Rule("tokenizer.ggml.add_bos_token", BOOL),
    Rule("tokenizer.ggml.add_eos_token", BOOL),
    Rule("tokenizer.chat_template", STR),
)

# Every key clip.cpp's load_hparams reads for a vision projector: its getters assert the type.
MMPROJ_RULES = (
    _required("general.architecture", STR, one_of("clip")),
    Rule("general.name", STR),
    Rule("general.description", STR),
    Rule("general.file_type", U32),
    _required("clip.has_vision_encoder", BOOL, true),
    Rule("clip.has_audio_encoder", BOOL),
    Rule("clip.has_gen_audio_encoder", BOOL),
    _required("clip.projector_type", STR),
    Rule("clip.vision.projector_type", STR),
    Rule("clip.use_gelu", BOOL),
    Rule("clip.use_silu", BOOL),
    _required("clip.vision.embedding_length", U32, positive),
    _required("clip.vision.feed_forward_length", U32, positive),
    _required("clip.vision.block_count", U32, positive),
    _required("clip.vision.projection_dim", U32),
    _required("clip.vision.attention.head_count", U32, positive),
    Rule("clip.vision.attention.head_count_kv", U32, positive),
    Rule("clip.vision.attention.head_dim", U32, positive),
    _required("clip.vision.attention.layer_norm_epsilon", F32, finite_positive),
    _required("clip.vision.image_size", U32, at_most(CLIP_MAX_IMAGE_SIZE)),
    _required("clip.vision.patch_size", U32, at_most(CLIP_MAX_PATCH_SIZE)),
    _required("clip.vision.image_mean", ARRAY, rgb_floats(positive_only=False), F32),
    _required("clip.vision.image_std", ARRAY, rgb_floats(positive_only=True), F32),
    Rule("clip.vision.spatial_merge_size", U32, one_of(1)),  # no patch merger in Pixtral 12B
    Rule("clip.vision.mm_patch_merge_type", STR),
    Rule("clip.vision.image_grid_pinpoints", ARRAY, item=I32),
    Rule("clip.vision.feature_layer", ARRAY, item=I32),
    Rule("clip.minicpmv_version", I32),
    Rule("clip.minicpmv_query_num", U32),
)


def text_problems(header: GGUFHeader) -> list[str]:
    """Every reason llama.cpp would refuse or abort on this text GGUF, one line each."""
    problems = list(_rule_problems(header, TEXT_RULES))
    if not problems:
        problems += _text_hparam_problems(header)
    if not problems:
        problems += _shape_problems(header, _text_shapes(header))
    return problems


def mmproj_problems(header: GGUFHeader) -> list[str]:
    """Every reason libmtmd would refuse or abort on this mmproj, one line each."""
    problems = list(_rule_problems(header, MMPROJ_RULES))
    if not problems:
        problems += _vision_hparam_problems(header)
    if not problems:
        problems += _shape_problems(header, _vision_shapes(header))
    return problems


def _show(value: Any) -> str:
    text = f"{value:.7g}" if isinstance(value, float) else repr(value)  # float32 values without float64 noise
    return text if len(text) <= 40 else text[:37] + "..."


def _problem(header: GGUFHeader, what: str) -> str:
    return f"{header.path.name}: {what}; {_FIX}"


def _rule_problems(header: GGUFHeader, rules: tuple[Rule, ...]) -> Iterator[str]:
    for rule in rules:
        if rule.key not in header.metadata:
            if rule.required:
                yield _problem(header, f"{rule.key} is missing")
            continue
        value, vtype = header.metadata[rule.key], header.value_types[rule.key]
        item = header.array_types.get(rule.key)
        if vtype != rule.type or (rule.item is not None and item != rule.item):
            expected = f"ARRAY of {rule.item.name}" if rule.item is not None else rule.type.name
            found = f"ARRAY of {item.name}" if item is not None else vtype.name
            yield _problem(header, f"{rule.key} = {_show(value)} is stored as {found}, llama.cpp reads {expected}")
            continue
        reason = rule.check(value)
        if reason:
            yield _problem(header, f"{rule.key} = {_show(value)} {reason}")


def _ratio_problem(header: GGUFHeader, key: str, divisor_key: str, whole: int, part: int) -> list[str]:
    if whole % part:
        return [_problem(header, f"{key} = {part} does not divide {divisor_key} = {whole}")]
    return []


def _text_hparam_problems(header: GGUFHeader) -> list[str]:
    meta = header.metadata
    width, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    problems = _ratio_problem(header, "llama.attention.head_count_kv", "llama.attention.head_count", heads, kv_heads)
    if "llama.attention.key_length" not in meta:
        problems += _ratio_problem(header, "llama.attention.head_count", "llama.embedding_length", width, heads)
    head_dim = meta.get("llama.attention.key_length", width // heads)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):  # graph asserts both equal
        if meta.get(key, head_dim) != head_dim:
            problems.append(_problem(header, f"{key} = {meta[key]} differs from the head size {head_dim}"))
    if head_dim % 2:
        problems.append(_problem(header, f"the head size {head_dim} is odd; RoPE rotates pairs"))
    n_tokens = len(meta["tokenizer.ggml.tokens"])
    counts = {"llama.vocab_size": meta.get("llama.vocab_size", n_tokens),
              "tokenizer.ggml.scores": len(meta.get("tokenizer.ggml.scores", meta["tokenizer.ggml.tokens"])),
              "tokenizer.ggml.token_type": len(meta.get("tokenizer.ggml.token_type", meta["tokenizer.ggml.tokens"]))}
    problems += [_problem(header, f"{key} counts {count} tokens but tokenizer.ggml.tokens holds {n_tokens}")
                 for key, count in counts.items() if count != n_tokens]
    return problems


def _vision_hparam_problems(header: GGUFHeader) -> list[str]:
    meta = header.metadata
    width, heads = meta["clip.vision.embedding_length"], meta["clip.vision.attention.head_count"]
    problems = []
    if "clip.vision.attention.head_dim" not in meta:
        problems += _ratio_problem(header, "clip.vision.attention.head_count", "clip.vision.embedding_length",
                                   width, heads)
    head_dim = meta.get("clip.vision.attention.head_dim", width // heads)
    if head_dim * heads != width:
        problems.append(_problem(header, f"{heads} heads of {head_dim} do not make the width {width}"))
    if head_dim % 4:  # 2-D RoPE rotates each half of a head in pairs
        problems.append(_problem(header, f"the vision head size {head_dim} is not a multiple of 4"))
    kv_heads = meta.get("clip.vision.attention.head_count_kv", heads)
    problems += _ratio_problem(header, "clip.vision.attention.head_count_kv", "clip.vision.attention.head_count",
                               heads, kv_heads)
    image, patch = meta["clip.vision.image_size"], meta["clip.vision.patch_size"]
    problems += _ratio_problem(header, "clip.vision.patch_size", "clip.vision.image_size", image, patch)
    patch_embd = header.tensors.get("v.patch_embd.weight")
    if patch_embd is not None and tuple(patch_embd.ne[:3]) != (patch, patch, 3):  # (p, p, RGB, width)
        problems.append(_problem(header, f"clip.vision.patch_size = {patch} does not match v.patch_embd.weight "
                                         f"of shape {list(patch_embd.ne)}"))
    if meta.get("clip.use_gelu") and meta.get("clip.use_silu"):
        problems.append(_problem(header, "clip.use_gelu and clip.use_silu are both true"))
    return problems


def _text_shapes(header: GGUFHeader) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Tensor name -> (ggml shape, required), as llama.cpp's llama_model_llama::load_arch_tensors creates them."""
    meta = header.metadata
    width, heads, ffn = (meta[f"llama.{k}"] for k in ("embedding_length", "attention.head_count",
                                                       "feed_forward_length"))
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    head_dim = meta.get("llama.attention.key_length", width // heads)
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    shapes = {"token_embd.weight": ((width, n_vocab), True), "output_norm.weight": ((width,), True),
              "output.weight": ((width, n_vocab), False)}
    for i in range(meta["llama.block_count"]):
        blk = f"blk.{i}"
        shapes |= {f"{blk}.attn_norm.weight": ((width,), True), f"{blk}.ffn_norm.weight": ((width,), True),
                   f"{blk}.attn_q.weight": ((width, head_dim * heads), True),
                   f"{blk}.attn_k.weight": ((width, head_dim * kv_heads), True),
                   f"{blk}.attn_v.weight": ((width, head_dim * kv_heads), True),
                   f"{blk}.attn_output.weight": ((head_dim * heads, width), True),
                   f"{blk}.ffn_gate.weight": ((width, ffn), True), f"{blk}.ffn_up.weight": ((width, ffn), True),
                   f"{blk}.ffn_down.weight": ((ffn, width), True)}
    return shapes


def _vision_shapes(header: GGUFHeader) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The tensors clip.cpp's Pixtral graph uses, with the shapes its reshapes assume (it checks none)."""
    meta = header.metadata
    width, heads, ffn, patch = (meta[f"clip.vision.{k}"] for k in (
        "embedding_length", "attention.head_count", "feed_forward_length", "patch_size"))
    head_dim = meta.get("clip.vision.attention.head_dim", width // heads)
    kv_width = head_dim * meta.get("clip.vision.attention.head_count_kv", heads)
    mm1, mm2 = header.tensors.get("mm.1.weight"), header.tensors.get("mm.2.weight")
    hidden = mm1.ne[-1] if mm1 is not None else 0
    out = mm2.ne[-1] if mm2 is not None else 0
    shapes = {"v.patch_embd.weight": ((patch, patch, 3, width), True), "v.pre_ln.weight": ((width,), False),
              "mm.1.weight": ((width, hidden), True), "mm.1.bias": ((hidden,), False),
              "mm.2.weight": ((hidden, out), True), "mm.2.bias": ((out,), False),
              "v.token_embd.img_break": ((out,), True)}
    for i in range(meta["clip.vision.block_count"]):
        blk = f"v.blk.{i}"
        shapes |= {f"{blk}.ln1.weight": ((width,), True), f"{blk}.ln2.weight": ((width,), True),
                   f"{blk}.attn_q.weight": ((width, head_dim * heads), True),
                   f"{blk}.attn_k.weight": ((width, kv_width), True),
                   f"{blk}.attn_v.weight": ((width, kv_width), True),
                   f"{blk}.attn_out.weight": ((head_dim * heads, width), True),
                   f"{blk}.ffn_gate.weight": ((width, ffn), False), f"{blk}.ffn_up.weight": ((width, ffn), True),
                   f"{blk}.ffn_down.weight": ((ffn, width), True)}
    return shapes


def _shape_problems(header: GGUFHeader, shapes: dict[str, tuple[tuple[int, ...], bool]]) -> list[str]:
    wrong = []
    for name, (shape, required) in shapes.items():
        tensor = header.tensors.get(name)
        if tensor is None:
            if required:
                wrong.append(f"tensor {name} is missing")
        elif tuple(tensor.ne) != shape:
            wrong.append(f"tensor {name} has shape {list(tensor.ne)}, the metadata implies {list(shape)}")
    if len(wrong) > _MAX_SHAPE_PROBLEMS:
        wrong = wrong[:_MAX_SHAPE_PROBLEMS] + [f"{len(wrong) - _MAX_SHAPE_PROBLEMS} more tensors are wrong"]
    return [_problem(header, what) for what in wrong]
