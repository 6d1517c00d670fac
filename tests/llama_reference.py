"""llama.cpp's own routes, as references for tests and benchmarks: its quantizer, and logits of a mixed
prompt evaluated straight through the backend (no chat template, no prompt cache).

pixtral-cpp quantizes while converting (convert/ with backend/row_quantizer.py) and never calls
llama_model_quantize; tests compare its output with this one, and bench_convert.py times it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pixtral_cpp.backend import TextModel, VisionContext, bindings, is_gguf, last_native_error, log_listener
from pixtral_cpp.convert.tokenizer import IMG_END_TOKEN
from pixtral_cpp.errors import ImageError, QuantizationError

# llama_ftype values (include/llama.h, mirrored as llama_cpp.LLAMA_FTYPE_*). Hard-coded so that the
# table is available without loading the shared library; a test checks it against the bindings.
LLAMA_FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38, "NVFP4": 39, "Q1_0": 40, "Q2_0": 41,
}

TensorProgress = Callable[[int, int, str], None]

# llama-quant.cpp logs "[%4d/%4d] %-36s - [shape], type = ..." once per tensor, before converting it.
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")

# llama.cpp converts each tensor to float32 in slabs of up to this size (default 8 GiB, i.e. the whole
# 131072 x 5120 embedding at once): a small slab bounds peak memory at no cost in speed.
QUANTIZE_SLAB_BYTES = 256 * 1024 * 1024


class _ProgressParser:
    """Turns quantize log lines into ``on_tensor(i, n, name)`` calls; keeps the first callback error."""

    def __init__(self, on_tensor: TensorProgress) -> None:
        self._on_tensor = on_tensor
        self.error: BaseException | None = None

    def __call__(self, text: str) -> None:
        match = _TENSOR_LINE.match(text)
        if match is None or self.error is not None:
            return
        try:
            self._on_tensor(int(match[1]), int(match[2]), match[3])
        except BaseException as exc:  # noqa: BLE001 - re-raised once the C call has returned
            self.error = exc


def quantize_gguf(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    threads: int,
    allow_requantize: bool = False,
    on_tensor: TensorProgress | None = None,
) -> None:
    """Write ``dst``, a copy of the GGUF ``src`` quantized to the llama_ftype ``ftype`` by llama.cpp."""
    src, dst = Path(src), Path(dst)
    _check_inputs(src, dst, ftype)
    llama, _ = bindings()
    params = llama.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.max_buf_size = QUANTIZE_SLAB_BYTES
    parser = _ProgressParser(on_tensor) if on_tensor is not None else None
    if parser is not None:
        with log_listener(parser):
            status = llama.llama_model_quantize(bytes(src), bytes(dst), params)
    else:
        status = llama.llama_model_quantize(bytes(src), bytes(dst), params)
    if status != 0:
        dst.unlink(missing_ok=True)  # llama.cpp may leave a partial file behind
        raise QuantizationError(f"quantizing {src} to {_ftype_name(ftype)} failed: {last_native_error()}")
    if parser is not None and parser.error is not None:
        raise parser.error


def _check_inputs(src: Path, dst: Path, ftype: int) -> None:
    if ftype not in LLAMA_FTYPES.values():
        raise QuantizationError(f"unknown llama_ftype {ftype}; choose one of {', '.join(LLAMA_FTYPES)}")
    if not src.is_file():
        raise QuantizationError(f"{src} does not exist or is not a file")
    if not is_gguf(src):
        raise QuantizationError(f"{src} is not a GGUF file (no GGUF magic); convert the checkpoint first")
    if src.resolve() == dst.resolve():
        raise QuantizationError(f"refusing to quantize {src} onto itself; choose another output path")
    if not dst.parent.is_dir():
        raise QuantizationError(f"output folder {dst.parent} does not exist")


def _ftype_name(ftype: int) -> str:
    return next((name for name, value in LLAMA_FTYPES.items() if value == ftype), str(ftype))


Segment = Sequence[int] | np.ndarray


def prompt_logits(text_model: TextModel, vision: VisionContext | None, segments: Sequence[Segment]) -> np.ndarray:
    """Last-position logits of a fresh sequence of token lists and images (H, W, 3), in order.

    Each image is followed by the [IMG_END] token, as mtmd and mistral-common lay it out.
    """
    text_model.clear()
    img_end = text_model.token_id(IMG_END_TOKEN)
    pending: list[int] = []
    for segment in segments:
        if isinstance(segment, np.ndarray) and segment.ndim == 3:
            if vision is None:
                raise ImageError("an image segment needs a VisionContext")
            if pending:
                text_model.eval_tokens(pending)
            text_model.decode_embeddings(vision.encode_rgb(segment).embeddings)
            pending = [img_end]
        else:
            pending.extend(int(t) for t in segment)
    if not pending:
        raise ValueError("prompt_logits needs at least one token or image")
    return text_model.eval_tokens(pending)
