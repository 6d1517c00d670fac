"""What a GGUF pair is beyond "does llama.cpp load it": who wrote it, and the quirks of files that others
converted, each with what pixtral-cpp does about it (docs/others-ggufs.md).

Read from the two headers alone. Each quirk is one of: runs as is, corrected at load time (exactly, from
the pair itself), or refused with the reason; `pixtral-cpp fix` (fix_pair.py) writes a pair without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from gguf import Keys

from pixtral_cpp.gguf_file import GGUFHeader
from pixtral_cpp.gguf_keys import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, IMG_BREAK_TENSOR, TextKeys

IMG_BREAK_ID = 12  # tekken's [IMG_BREAK]; the mmproj's vector is this row of the text embedding
IMG_BREAK_TOKEN = "[IMG_BREAK]"
TOKEN_EMBD = "token_embd.weight"
LLAMA_CPP_WRITER = "llama.cpp convert_hf_to_gguf.py"
PIXTRAL_CPP_WRITER = "pixtral-cpp convert"
PIXTRAL_CPP_FIX_WRITER = "pixtral-cpp fix"
TEKKEN_PRE = "tekken"  # llama.cpp's tekken split rule, the nearest to mistral-common's
FIX_HINT = "`pixtral-cpp fix PAIR -o DIR` writes a corrected pair"
# pixtral-cpp writes its general.* keys in this order and no general.size_label (convert/metadata.py);
# llama.cpp's converter always writes general.size_label (its gguf.Metadata counts the parameters).
_PIXTRAL_CPP_FIRST_KEYS = (Keys.General.ARCHITECTURE, Keys.General.TYPE, Keys.General.NAME)
FIXED_BY_KEY = "pixtral_cpp.fixed"  # what `pixtral-cpp fix` corrected, written into the files it writes
_FLOAT32_TOLERANCE = 1e-6  # mean/std are stored as float32


class Handling(Enum):
    AS_IS = "runs as is"
    CORRECTED = "corrected at load time"
    REFUSED = "refused"


@dataclass(frozen=True)
class Quirk:
    name: str  # stable identifier, e.g. "img_break_missing"
    what: str  # one line for `info`
    handling: Handling
    fixable: bool  # `pixtral-cpp fix` removes it


@dataclass(frozen=True)
class PairQuirks:
    text_writer: str
    mmproj_writer: str
    text_type: str | None  # general.type
    mmproj_type: str | None
    pre_tokenizer: str | None
    chat_template: str  # "none", "pixtral-cpp's", "the name '...'", "another Jinja template (...)"
    has_img_break: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    normalization: str
    context_length: int | None
    quirks: tuple[Quirk, ...]

    def named(self, name: str) -> Quirk | None:
        return next((q for q in self.quirks if q.name == name), None)

    @property
    def refused(self) -> tuple[Quirk, ...]:
        return tuple(q for q in self.quirks if q.handling is Handling.REFUSED)

    @property
    def corrected(self) -> tuple[Quirk, ...]:
        return tuple(q for q in self.quirks if q.handling is Handling.CORRECTED)

    @property
    def needs_img_break(self) -> bool:
        quirk = self.named("img_break_missing")
        return quirk is not None and quirk.handling is Handling.CORRECTED

    @property
    def verdict(self) -> str:
        if self.refused:
            fix = " (" + FIX_HINT + ")" if all(q.fixable for q in self.refused) else ""
            return "does not run: " + "; ".join(q.what for q in self.refused) + fix
        if self.corrected:
            return "runs faithfully with a correction: " + "; ".join(q.what for q in self.corrected)
        return "runs faithfully as is"


def pair_quirks(text: GGUFHeader, mmproj: GGUFHeader) -> PairQuirks:
    """The facts of a text GGUF + mmproj pair and how pixtral-cpp handles each quirk."""
    template = _template_kind(text.get(Keys.Tokenizer.CHAT_TEMPLATE))
    mean, std = _floats(mmproj.get(Keys.ClipVision.IMAGE_MEAN)), _floats(mmproj.get(Keys.ClipVision.IMAGE_STD))
    normalization, norm_quirk = _normalization(mean, std)
    has_break = IMG_BREAK_TENSOR in mmproj.tensors
    context = text.get(TextKeys.CONTEXT_LENGTH)
    pre = _str_or_none(text.get(Keys.Tokenizer.PRE))
    quirks = [q for q in (norm_quirk, None if has_break else _img_break_quirk(text), _context_quirk(context),
                          _pre_tokenizer_quirk(pre), _template_quirk(template)) if q is not None]
    return PairQuirks(
        text_writer=writer_of(text, template), mmproj_writer=writer_of(mmproj, None),
        text_type=_str_or_none(text.get(Keys.General.TYPE)), mmproj_type=_str_or_none(mmproj.get(Keys.General.TYPE)),
        pre_tokenizer=pre, chat_template=template,
        has_img_break=has_break, image_mean=mean, image_std=std, normalization=normalization,
        context_length=context if isinstance(context, int) else None, quirks=tuple(quirks))


def writer_of(header: GGUFHeader, template_kind: str | None) -> str:
    """Who wrote the file, inferred from its general.* keys (no converter records its name or version)."""
    meta = header.metadata
    if Keys.General.SIZE_LABEL in meta:
        who = f"{LLAMA_CPP_WRITER} (it writes general.size_label = {meta[Keys.General.SIZE_LABEL]!r})"
    elif tuple(meta)[:3] == _PIXTRAL_CPP_FIRST_KEYS and (template_kind is None or "pixtral-cpp" in template_kind):
        who = PIXTRAL_CPP_WRITER
    else:
        who = "unknown"
    if FIXED_BY_KEY in meta:
        who = f"{PIXTRAL_CPP_FIX_WRITER}, from a file by {who}"
    quantized_by = meta.get(Keys.General.QUANTIZED_BY)
    if isinstance(quantized_by, str):
        who += f", quantized by {quantized_by}"
    if any(key.startswith("quantize.imatrix") for key in meta):
        who += ", with an importance matrix (llama-quantize)"
    return who


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _floats(value: object) -> tuple[float, ...]:
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    return ()


def _close(values: tuple[float, ...], reference: tuple[float, ...]) -> bool:
    return len(values) == len(reference) and all(
        math.isclose(a, b, rel_tol=_FLOAT32_TOLERANCE) for a, b in zip(values, reference, strict=True))


def _normalization(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[str, Quirk | None]:
    if _close(mean, CLIP_IMAGE_MEAN) and _close(std, CLIP_IMAGE_STD):
        return "CLIP mean/std, as Pixtral", None
    if _close(mean, CLIP_IMAGE_MEAN) and _close(std, CLIP_IMAGE_MEAN):
        what = ("clip.vision.image_std holds the image mean (llama.cpp's converter before April 2025, "
                "ggml-org/llama.cpp#13208): every image would be normalised wrongly, and libmtmd reads the "
                "value from the file")
        return "std written as the mean (llama.cpp#13208)", Quirk("std_is_mean", what, Handling.REFUSED, True)
    if _close(mean, CLIP_IMAGE_STD) and _close(std, CLIP_IMAGE_MEAN):
        what = ("clip.vision.image_mean and image_std are swapped: every image would be normalised wrongly, and "
                "libmtmd reads the values from the file")
        return "mean and std swapped", Quirk("mean_std_swapped", what, Handling.REFUSED, True)
    return f"not Pixtral's (mean {list(mean)}, std {list(std)}); used as written", None


def img_break_source_problem(text: GGUFHeader) -> str | None:
    """Why the text model's token 12 cannot stand in for v.token_embd.img_break, or None if it can."""
    tokens = text.get(Keys.Tokenizer.LIST)
    if not isinstance(tokens, list) or len(tokens) <= IMG_BREAK_ID or tokens[IMG_BREAK_ID] != IMG_BREAK_TOKEN:
        return f"token {IMG_BREAK_ID} of {text.path.name} is not {IMG_BREAK_TOKEN}"
    embd = text.tensors.get(TOKEN_EMBD)
    if embd is None or len(embd.ne) != 2 or embd.ne[1] <= IMG_BREAK_ID:
        return f"{text.path.name} has no {TOKEN_EMBD} with a row {IMG_BREAK_ID}"
    return None


def _img_break_quirk(text: GGUFHeader) -> Quirk:
    problem = img_break_source_problem(text)
    if problem:
        return Quirk("img_break_missing", f"the mmproj lacks {IMG_BREAK_TENSOR} and {problem}",
                     Handling.REFUSED, False)
    what = (f"the mmproj lacks {IMG_BREAK_TENSOR} (libmtmd refuses a Pixtral mmproj without it); pixtral-cpp "
            f"takes the vector from the text model's {IMG_BREAK_TOKEN} embedding (row {IMG_BREAK_ID} of "
            f"{TOKEN_EMBD}) and loads a corrected copy of the mmproj kept in its cache")
    return Quirk("img_break_missing", what, Handling.CORRECTED, True)


def _context_quirk(context: object) -> Quirk | None:
    if context is not None:
        return None
    what = (f"{TextKeys.CONTEXT_LENGTH} is missing (llama.cpp's converter leaves it out when converting Mistral's "
            f"native params.json, which has no context length), and llama.cpp cannot load the model without it")
    return Quirk("context_length_missing", what, Handling.REFUSED, True)


def _pre_tokenizer_quirk(pre: str | None) -> Quirk | None:
    if pre == TEKKEN_PRE:
        return None
    what = (f"pre-tokenizer {pre!r}: llama.cpp splits text by another rule than tekken's (`pixtral` is its "
            f"Llama-3 rule: O'Donnell splits differently); pixtral-cpp tokenizes prompt text by tekken's own "
            f"rule, so only other tools are affected (`pixtral-cpp fix` writes {TEKKEN_PRE!r})")
    return Quirk("pre_tokenizer", what, Handling.AS_IS, True)


def _template_kind(template: object) -> str:
    if template is None:
        return "none"
    if not isinstance(template, str):
        return "unreadable"
    if "written by pixtral-cpp" in template[:200]:  # its first comment says so (convert/chat_template.py)
        return "pixtral-cpp's"
    if "{%" not in template and "{{" not in template:
        return f"the name {template[:40]!r}"
    return f"another Jinja template ({len(template)} characters)"


def _template_quirk(kind: str) -> Quirk | None:
    if kind.startswith("pixtral-cpp"):
        return None
    what = (f"chat template: {kind}; pixtral-cpp builds its prompts itself, so only other tools use it "
            f"(`pixtral-cpp fix` writes pixtral-cpp's)")
    return Quirk("chat_template", what, Handling.AS_IS, True)
