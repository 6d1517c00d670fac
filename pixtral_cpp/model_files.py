"""Find a text GGUF + mmproj pair and check that they belong together before llama.cpp sees them.

llama.cpp aborts or misbehaves on some mismatches (a non-Pixtral projector, a different embedding
width, a truncated file); everything here is checked from the GGUF headers in Python first.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import Keys

from pixtral_cpp.errors import ModelError
from pixtral_cpp.gguf_checks import mmproj_problems, text_problems
from pixtral_cpp.gguf_file import GGUFHeader, read_gguf_header
from pixtral_cpp.gguf_keys import IMG_BREAK_TENSOR, MMPROJ_ARCH, PIXTRAL_PROJECTOR, TEXT_ARCH, TextKeys
from pixtral_cpp.paths import default_models_dir

MODEL_ENV = "PIXTRAL_CPP_MODEL"
VIS = Keys.ClipVision
_HOW_TO_GET_ONE = ("convert a checkpoint first, e.g. `pixtral-cpp convert mistralai/Pixtral-12B-2409`, "
                   "or pass --model PATH")


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

    @property
    def matches(self) -> bool:
        return not self.problems


def find_model_files(model: Path | str | None = None, mmproj: Path | str | None = None) -> ModelFiles:
    """--model (a .gguf or a folder), else $PIXTRAL_CPP_MODEL, else the default models folder."""
    where = model or os.environ.get(MODEL_ENV) or default_models_dir()
    path = Path(where).expanduser()
    if path.is_dir():
        text = _only_text_model(path)
    elif path.is_file():
        text = path
    else:
        origin = "--model" if model else (MODEL_ENV if os.environ.get(MODEL_ENV) else "the default models folder")
        raise ModelError(f"no model at {path} ({origin}); {_HOW_TO_GET_ONE}")
    if mmproj is not None:
        mm = Path(mmproj).expanduser()
        if not mm.is_file():
            raise ModelError(f"mmproj {mm} does not exist")
        return ModelFiles(text, mm)
    return ModelFiles(text, _matching_mmproj(text))


def _only_text_model(folder: Path) -> Path:
    candidates = sorted(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj"))
    if not candidates:
        raise ModelError(f"no text model (*.gguf) in {folder}; {_HOW_TO_GET_ONE}")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ModelError(f"{folder} holds several models ({names}); choose one with --model FILE")
    return candidates[0]


def _matching_mmproj(text: Path) -> Path:
    """`mmproj-<Model>-<QUANT>.gguf` beside `<Model>-<QUANT>.gguf`, the names `convert` writes."""
    projectors = sorted(text.parent.glob("mmproj*.gguf"))
    if not projectors:
        raise ModelError(f"no mmproj (mmproj-*.gguf) beside {text}; pass --mmproj PATH or re-run convert")
    if len(projectors) == 1:
        return projectors[0]
    model_name = text.stem.rsplit("-", 1)[0]
    same_model = [p for p in projectors if p.name.startswith(f"mmproj-{model_name}-")]
    if len(same_model) >= 1:
        return min(same_model, key=_precision_rank)
    names = ", ".join(p.name for p in projectors)
    raise ModelError(f"several mmproj files beside {text} ({names}); choose one with --mmproj PATH")


def _precision_rank(path: Path) -> int:
    """Prefer the most precise projector when several quantizations sit side by side."""
    for rank, tag in enumerate(("-F32", "-F16", "-BF16", "-Q8_0")):
        if path.stem.endswith(tag):
            return rank
    return 99


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
    header = read_gguf_header(path)
    if header.architecture != TEXT_ARCH:
        looks_like = " — it looks like an mmproj" if header.architecture == MMPROJ_ARCH else ""
        raise ModelError(f"{path} is not a Pixtral text model (architecture {header.architecture!r}, "
                         f"expected {TEXT_ARCH!r}){looks_like}")
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
    header = read_gguf_header(path)
    if header.architecture != MMPROJ_ARCH:
        raise ModelError(f"{path} is not an mmproj (architecture {header.architecture!r}, expected {MMPROJ_ARCH!r})")
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
    """Both files' facts and every reason they would not work together."""
    text, vision = read_text_info(files.text), read_vision_info(files.mmproj)
    problems = [*text.problems, *vision.problems]
    if vision.projector_type != PIXTRAL_PROJECTOR:
        problems.append(f"{files.mmproj.name} is a {vision.projector_type!r} projector, not Pixtral's")
    if vision.output_embedding_length != text.embedding_length:
        problems.append(f"{files.mmproj.name} produces embeddings of width {vision.output_embedding_length} but "
                        f"{files.text.name} expects {text.embedding_length}: they come from different models")
    if not vision.has_img_break:
        problems.append(f"{files.mmproj.name} lacks {IMG_BREAK_TENSOR}; re-convert it with pixtral-cpp")
    if vision.projector_type == PIXTRAL_PROJECTOR and not vision.use_silu:
        problems.append(f"{files.mmproj.name} lacks {VIS.USE_SILU}; llama.cpp would run the wrong activation")
    return PairInfo(text, vision, tuple(problems))


def check_pair(files: ModelFiles) -> PairInfo:
    """inspect_pair, raising ModelError when the pair cannot run."""
    info = inspect_pair(files)
    if info.problems:
        raise ModelError("; ".join(info.problems))
    return info
