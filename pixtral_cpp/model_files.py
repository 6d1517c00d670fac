"""Find a text GGUF + mmproj pair and check that they belong together before llama.cpp sees them.

llama.cpp aborts or misbehaves on some mismatches (a non-Pixtral projector, a different embedding
width, a truncated file); everything here is checked from the GGUF headers in Python first.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import Keys

from pixtral_cpp.errors import ModelError
from pixtral_cpp.gguf_checks import mmproj_problems, text_problems
from pixtral_cpp.gguf_file import GGUFHeader, read_gguf_header
from pixtral_cpp.gguf_keys import IMG_BREAK_TENSOR, MMPROJ_ARCH, PIXTRAL_PROJECTOR, TEXT_ARCH, TextKeys
from pixtral_cpp.pair_quirks import FIX_HINT, PairQuirks, pair_quirks

MODEL_ENV = "PIXTRAL_CPP_MODEL"
VIS = Keys.ClipVision
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    text: Path
    mmproj: Path


@dataclass(frozen=True)
class TextInfo:
    path: Path
    size_bytes: int
    file_type: str
    tensor_types: dict[str, int]
    name: str | None
    embedding_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    head_dim: int
    feed_forward_length: int
    context_length: int
    vocab_size: int
    rope_freq_base: float
    problems: tuple[str, ...] = ()  # what llama.cpp would refuse or abort on (gguf_checks)


@dataclass(frozen=True)
class VisionInfo:
    path: Path
    size_bytes: int
    file_type: str
    projector_type: str | None
    output_embedding_length: int  # mm.2's output width: must equal the text model's embedding length
    embedding_length: int
    block_count: int
    head_count: int
    image_size: int
    patch_size: int
    use_silu: bool
    has_img_break: bool
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairInfo:
    text: TextInfo
    vision: VisionInfo
    problems: tuple[str, ...]
    quirks: PairQuirks | None = None  # who wrote the files and what pixtral-cpp does about their quirks

    @property
    def matches(self) -> bool:
        return not self.problems


def find_model_files(model: Path | str | None = None, mmproj: Path | str | None = None,
                     mmproj_quant: str | None = None) -> ModelFiles:
    """--model as a .gguf, a folder, FOLDER:QUANT or a hub repo user/repo[:QUANT], else $PIXTRAL_CPP_MODEL, else
    the default models folder (pixtral_cpp.model_sources, which logs what it chose among several files)."""
    from pixtral_cpp.model_sources import resolve_model  # it builds on this module's ModelFiles

    resolved = resolve_model(model, mmproj, mmproj_quant)
    for note in resolved.notes:
        log.info("%s", note)
    return resolved.files


def _file_type(header: GGUFHeader) -> str:
    value = header.get(Keys.General.FILE_TYPE)
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return "unknown"


def _number(header: GGUFHeader, key: str, default: int | float = 0) -> int | float:
    """A numeric metadata value for display; a mistyped one is reported by gguf_checks, shown as the default."""
    value = header.get(key, default)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def read_text_info(path: Path) -> TextInfo:
    return _text_info(_text_header(path))


def _text_header(path: Path) -> GGUFHeader:
    header = read_gguf_header(path)
    if header.architecture != TEXT_ARCH:
        looks_like = " — it looks like an mmproj" if header.architecture == MMPROJ_ARCH else ""
        raise ModelError(f"{path} is not a Pixtral text model (architecture {header.architecture!r}, "
                         f"expected {TEXT_ARCH!r}){looks_like}")
    return header


def _text_info(header: GGUFHeader) -> TextInfo:
    path = header.path
    width, heads = _number(header, TextKeys.EMBEDDING_LENGTH), _number(header, TextKeys.HEAD_COUNT)
    tokens = header.get(Keys.Tokenizer.LIST, ())
    return TextInfo(
        path=path, size_bytes=header.file_size, file_type=_file_type(header),
        tensor_types=dict(Counter(t.type.name for t in header.tensors.values())),
        name=header.get(Keys.General.NAME), embedding_length=width,
        block_count=_number(header, TextKeys.BLOCK_COUNT), head_count=heads,
        head_count_kv=_number(header, TextKeys.HEAD_COUNT_KV, heads),
        head_dim=_number(header, TextKeys.KEY_LENGTH, width // heads if heads else 0),
        feed_forward_length=_number(header, TextKeys.FEED_FORWARD_LENGTH),
        context_length=_number(header, TextKeys.CONTEXT_LENGTH),
        vocab_size=len(tokens) if isinstance(tokens, list) else 0,
        rope_freq_base=_number(header, TextKeys.ROPE_FREQ_BASE, 10000.0),
        problems=tuple(text_problems(header)),
    )


def read_vision_info(path: Path) -> VisionInfo:
    return _vision_info(_vision_header(path))


def _vision_header(path: Path) -> GGUFHeader:
    header = read_gguf_header(path)
    if header.architecture != MMPROJ_ARCH:
        raise ModelError(f"{path} is not an mmproj (architecture {header.architecture!r}, expected {MMPROJ_ARCH!r})")
    return header


def _vision_info(header: GGUFHeader) -> VisionInfo:
    path = header.path
    mm2 = header.tensors.get("mm.2.weight")
    projector = header.get(Keys.Clip.PROJECTOR_TYPE)
    return VisionInfo(
        path=path, size_bytes=header.file_size, file_type=_file_type(header),
        projector_type=projector if isinstance(projector, str) else None,
        output_embedding_length=int(mm2.ne[-1]) if mm2 is not None else 0,
        embedding_length=_number(header, VIS.EMBEDDING_LENGTH),
        block_count=_number(header, VIS.BLOCK_COUNT),
        head_count=_number(header, VIS.Attention.HEAD_COUNT),
        image_size=_number(header, VIS.IMAGE_SIZE), patch_size=_number(header, VIS.PATCH_SIZE),
        use_silu=header.get(VIS.USE_SILU) is True,
        has_img_break=IMG_BREAK_TENSOR in header.tensors,
        problems=tuple(mmproj_problems(header)),
    )


def inspect_pair(files: ModelFiles) -> PairInfo:
    """Both files' facts, their quirks and every reason they would not work together."""
    text_header, vision_header = _text_header(files.text), _vision_header(files.mmproj)
    text, vision = _text_info(text_header), _vision_info(vision_header)
    quirks = pair_quirks(text_header, vision_header)
    # A quirk's own line (what it is, why, what fixes it) replaces gguf_checks' bare "is missing".
    replaced = [f"{key} is missing" for key in (TextKeys.CONTEXT_LENGTH,) if quirks.named("context_length_missing")]
    problems = [p for p in text.problems if not any(r in p for r in replaced)]
    problems += [*vision.problems, *(f"{files.text.name} + {files.mmproj.name}: {q.what}; {FIX_HINT}"
                                     if q.fixable else q.what for q in quirks.refused)]
    if vision.projector_type != PIXTRAL_PROJECTOR:
        problems.append(f"{files.mmproj.name} is a {vision.projector_type!r} projector, not Pixtral's")
    if vision.output_embedding_length != text.embedding_length:
        problems.append(f"{files.mmproj.name} produces embeddings of width {vision.output_embedding_length} but "
                        f"{files.text.name} expects {text.embedding_length}: they come from different models")
    if vision.projector_type == PIXTRAL_PROJECTOR and not vision.use_silu:
        problems.append(f"{files.mmproj.name} lacks {VIS.USE_SILU}; llama.cpp would run the wrong activation")
    return PairInfo(text, vision, tuple(problems), quirks)


def check_pair(files: ModelFiles) -> PairInfo:
    """inspect_pair, raising ModelError when the pair cannot run."""
    info = inspect_pair(files)
    if info.problems:
        raise ModelError("; ".join(info.problems))
    return info
