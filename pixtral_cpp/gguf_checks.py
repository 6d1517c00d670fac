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

from gguf import GGUFValueType, Keys

from pixtral_cpp.gguf_file import GGUFHeader
from pixtral_cpp.gguf_keys import IMG_BREAK_TENSOR, MMPROJ_ARCH, TEXT_ARCH, ClipExtraKeys, TextKeys

U32, I32, F32 = GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32
STR, BOOL, ARRAY = GGUFValueType.STRING, GGUFValueType.BOOL, GGUFValueType.ARRAY
LLAMA_MAX_LAYERS = 512  # llama-hparams.h; GGML_ASSERT(n_layer <= LLAMA_MAX_LAYERS)
CLIP_MAX_IMAGE_SIZE, CLIP_MAX_PATCH_SIZE = 8192, 65535  # clip.cpp load_hparams' sanity checks
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # anything else: GGML_ASSERT in load_hparams
_FIX = "re-convert or re-download it"
GEN, TOK, CLIP, VIS = Keys.General, Keys.Tokenizer, Keys.Clip, Keys.ClipVision
TEXT, CLIP_EXTRA = TextKeys, ClipExtraKeys
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
    _required(GEN.ARCHITECTURE, STR, one_of(TEXT_ARCH)),
    Rule(GEN.NAME, STR),
    Rule(GEN.FILE_TYPE, U32),
    _required(TEXT.CONTEXT_LENGTH, U32, positive),
    _required(TEXT.EMBEDDING_LENGTH, U32, positive),
    _required(TEXT.BLOCK_COUNT, U32, at_most(LLAMA_MAX_LAYERS)),
    _required(TEXT.FEED_FORWARD_LENGTH, U32, positive),
    _required(TEXT.HEAD_COUNT, U32, positive),
    Rule(TEXT.HEAD_COUNT_KV, U32, positive),
    Rule(TEXT.KEY_LENGTH, U32, positive),
    Rule(TEXT.VALUE_LENGTH, U32, positive),
    Rule(TEXT.ROPE_DIMENSION_COUNT, U32, positive),
    Rule(TEXT.ROPE_FREQ_BASE, F32, finite_positive),
    _required(TEXT.LAYERNORM_RMS_EPS, F32, finite_positive),
    Rule(TEXT.VOCAB_SIZE, U32, positive),
    Rule(TEXT.EXPERT_COUNT, U32, zero),
    Rule(TEXT.EXPERT_USED_COUNT, U32, zero),
    Rule(TEXT.ROPE_SCALING_TYPE, STR, one_of(*ROPE_SCALING_TYPES)),
    Rule(TEXT.ROPE_SCALING_FACTOR, F32, lambda v: None if math.isfinite(v) and v >= 0 else "must be finite"),
    _required(TOK.MODEL, STR),
    Rule(TOK.PRE, STR),
    _required(TOK.LIST, ARRAY, lambda v: None if v else "must not be empty", STR),
    # FLOAT32 or INT32 items: llama-vocab.cpp reads both; llama.cpp's converter writes INT32 zeros from params.json
    Rule(TOK.SCORES, ARRAY, lambda v: None if all(isinstance(x, (int, float)) for x in v) else "must hold numbers"),
    Rule(TOK.TOKEN_TYPE, ARRAY, item=I32),
    Rule(TOK.MERGES, ARRAY, item=STR),
    Rule(TOK.BOS_ID, U32),
    Rule(TOK.EOS_ID, U32),
    Rule(TOK.UNK_ID, U32),
    Rule(TOK.PAD_ID, U32),
    Rule(TOK.ADD_BOS, BOOL),
    Rule(TOK.ADD_EOS, BOOL),
    Rule(TOK.CHAT_TEMPLATE, STR),
)

# Every key clip.cpp's load_hparams reads for a vision projector: its getters assert the type.
MMPROJ_RULES = (
    _required(GEN.ARCHITECTURE, STR, one_of(MMPROJ_ARCH)),
    Rule(GEN.NAME, STR),
    Rule(GEN.DESCRIPTION, STR),
    Rule(GEN.FILE_TYPE, U32),
    _required(CLIP.HAS_VISION_ENCODER, BOOL, true),
    Rule(CLIP.HAS_AUDIO_ENCODER, BOOL),
    Rule(CLIP_EXTRA.HAS_GEN_AUDIO_ENCODER, BOOL),
    _required(CLIP.PROJECTOR_TYPE, STR),
    Rule(VIS.PROJECTOR_TYPE, STR),
    Rule(VIS.USE_GELU, BOOL),
    Rule(VIS.USE_SILU, BOOL),
    _required(VIS.EMBEDDING_LENGTH, U32, positive),
    _required(VIS.FEED_FORWARD_LENGTH, U32, positive),
    _required(VIS.BLOCK_COUNT, U32, positive),
    _required(VIS.PROJECTION_DIM, U32),
    _required(VIS.Attention.HEAD_COUNT, U32, positive),
    Rule(CLIP_EXTRA.VISION_HEAD_COUNT_KV, U32, positive),
    Rule(CLIP_EXTRA.VISION_HEAD_DIM, U32, positive),
    _required(VIS.Attention.LAYERNORM_EPS, F32, finite_positive),
    _required(VIS.IMAGE_SIZE, U32, at_most(CLIP_MAX_IMAGE_SIZE)),
    _required(VIS.PATCH_SIZE, U32, at_most(CLIP_MAX_PATCH_SIZE)),
    _required(VIS.IMAGE_MEAN, ARRAY, rgb_floats(positive_only=False), F32),
    _required(VIS.IMAGE_STD, ARRAY, rgb_floats(positive_only=True), F32),
    Rule(VIS.SPATIAL_MERGE_SIZE, U32, one_of(1)),  # no patch merger in Pixtral 12B
    Rule(CLIP_EXTRA.MM_PATCH_MERGE_TYPE, STR),
    Rule(CLIP_EXTRA.IMAGE_GRID_PINPOINTS, ARRAY, item=I32),
    Rule(CLIP_EXTRA.FEATURE_LAYER, ARRAY, item=I32),
    Rule(CLIP_EXTRA.MINICPMV_VERSION, I32),
    Rule(CLIP_EXTRA.MINICPMV_QUERY_NUM, U32),
)


def text_problems(header: GGUFHeader) -> list[str]:
    """Every reason llama.cpp would refuse or abort on this text GGUF, one line each."""
    return _staged_problems(header, TEXT_RULES, _text_hparam_problems, _text_shapes)


def mmproj_problems(header: GGUFHeader) -> list[str]:
    """Every reason libmtmd would refuse or abort on this mmproj, one line each."""
    return _staged_problems(header, MMPROJ_RULES, _vision_hparam_problems, _vision_shapes)


def _staged_problems(header: GGUFHeader, rules: tuple[Rule, ...],
                     hparam_problems: Callable[[GGUFHeader], list[str]],
                     shapes: Callable[[GGUFHeader], dict[str, tuple[tuple[int, ...], bool]]]) -> list[str]:
    """Keys first, then the hyper-parameters they give, then tensor shapes: each stage reads only what the
    one before it has found sound."""
    problems = list(_rule_problems(header, rules))
    if not problems:
        problems += hparam_problems(header)
    if not problems:
        problems += _shape_problems(header, shapes(header))
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
    width, heads = meta[TEXT.EMBEDDING_LENGTH], meta[TEXT.HEAD_COUNT]
    kv_heads = meta.get(TEXT.HEAD_COUNT_KV, heads)
    problems = _ratio_problem(header, TEXT.HEAD_COUNT_KV, TEXT.HEAD_COUNT, heads, kv_heads)
    if TEXT.KEY_LENGTH not in meta:
        problems += _ratio_problem(header, TEXT.HEAD_COUNT, TEXT.EMBEDDING_LENGTH, width, heads)
    head_dim = meta.get(TEXT.KEY_LENGTH, width // heads)
    for key in (TEXT.VALUE_LENGTH, TEXT.ROPE_DIMENSION_COUNT):  # graph asserts both equal
        if meta.get(key, head_dim) != head_dim:
            problems.append(_problem(header, f"{key} = {meta[key]} differs from the head size {head_dim}"))
    if head_dim % 2:
        problems.append(_problem(header, f"the head size {head_dim} is odd; RoPE rotates pairs"))
    n_tokens = len(meta[TOK.LIST])
    counts = {TEXT.VOCAB_SIZE: meta.get(TEXT.VOCAB_SIZE, n_tokens),
              TOK.SCORES: len(meta.get(TOK.SCORES, meta[TOK.LIST])),
              TOK.TOKEN_TYPE: len(meta.get(TOK.TOKEN_TYPE, meta[TOK.LIST]))}
    problems += [_problem(header, f"{key} counts {count} tokens but {TOK.LIST} holds {n_tokens}")
                 for key, count in counts.items() if count != n_tokens]
    return problems


def _vision_hparam_problems(header: GGUFHeader) -> list[str]:
    meta = header.metadata
    width, heads = meta[VIS.EMBEDDING_LENGTH], meta[VIS.Attention.HEAD_COUNT]
    problems = []
    if CLIP_EXTRA.VISION_HEAD_DIM not in meta:
        problems += _ratio_problem(header, VIS.Attention.HEAD_COUNT, VIS.EMBEDDING_LENGTH,
                                   width, heads)
    head_dim = meta.get(CLIP_EXTRA.VISION_HEAD_DIM, width // heads)
    if head_dim * heads != width:
        problems.append(_problem(header, f"{heads} heads of {head_dim} do not make the width {width}"))
    if head_dim % 4:  # 2-D RoPE rotates each half of a head in pairs
        problems.append(_problem(header, f"the vision head size {head_dim} is not a multiple of 4"))
    kv_heads = meta.get(CLIP_EXTRA.VISION_HEAD_COUNT_KV, heads)
    problems += _ratio_problem(header, CLIP_EXTRA.VISION_HEAD_COUNT_KV, VIS.Attention.HEAD_COUNT,
                               heads, kv_heads)
    image, patch = meta[VIS.IMAGE_SIZE], meta[VIS.PATCH_SIZE]
    problems += _ratio_problem(header, VIS.PATCH_SIZE, VIS.IMAGE_SIZE, image, patch)
    patch_embd = header.tensors.get("v.patch_embd.weight")
    if patch_embd is not None and tuple(patch_embd.ne[:3]) != (patch, patch, 3):  # (p, p, RGB, width)
        problems.append(_problem(header, f"{VIS.PATCH_SIZE} = {patch} does not match v.patch_embd.weight "
                                         f"of shape {list(patch_embd.ne)}"))
    if meta.get(VIS.USE_GELU) and meta.get(VIS.USE_SILU):
        problems.append(_problem(header, f"{VIS.USE_GELU} and {VIS.USE_SILU} are both true"))
    return problems


def _text_shapes(header: GGUFHeader) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Tensor name -> (ggml shape, required), as llama.cpp's llama_model_llama::load_arch_tensors creates them."""
    meta = header.metadata
    width, heads, ffn = (meta[k] for k in (TEXT.EMBEDDING_LENGTH, TEXT.HEAD_COUNT, TEXT.FEED_FORWARD_LENGTH))
    kv_heads = meta.get(TEXT.HEAD_COUNT_KV, heads)
    head_dim = meta.get(TEXT.KEY_LENGTH, width // heads)
    n_vocab = len(meta[TOK.LIST])
    shapes = {"token_embd.weight": ((width, n_vocab), True), "output_norm.weight": ((width,), True),
              "output.weight": ((width, n_vocab), False)}
    for i in range(meta[TEXT.BLOCK_COUNT]):
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
    width, heads, ffn, patch = (meta[k] for k in (
        VIS.EMBEDDING_LENGTH, VIS.Attention.HEAD_COUNT, VIS.FEED_FORWARD_LENGTH, VIS.PATCH_SIZE))
    head_dim = meta.get(CLIP_EXTRA.VISION_HEAD_DIM, width // heads)
    kv_width = head_dim * meta.get(CLIP_EXTRA.VISION_HEAD_COUNT_KV, heads)
    mm1, mm2 = header.tensors.get("mm.1.weight"), header.tensors.get("mm.2.weight")
    hidden = mm1.ne[-1] if mm1 is not None else 0
    out = mm2.ne[-1] if mm2 is not None else 0
    shapes = {"v.patch_embd.weight": ((patch, patch, 3, width), True), "v.pre_ln.weight": ((width,), False),
              "mm.1.weight": ((width, hidden), True), "mm.1.bias": ((hidden,), False),
              "mm.2.weight": ((hidden, out), True), "mm.2.bias": ((out,), False),
              IMG_BREAK_TENSOR: ((out,), False)}  # absent: pair_quirks supplies it from the text model
    for i in range(meta[VIS.BLOCK_COUNT]):
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
