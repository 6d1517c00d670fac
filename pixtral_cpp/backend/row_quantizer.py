"""ggml's own row quantizers, called directly on rows of a tensor from several threads.

The converter streams each tensor through here instead of writing a 24.5 GB lossless GGUF for
llama.cpp's quantizer to read back: the same ggml functions (`ggml_quantize_chunk`, which
llama-quantize calls too) give the same bytes, without the intermediate file and its I/O. The C calls
release the GIL, so the threads quantize in parallel; each thread also widens its own rows to float32
in C, so no float32 copy of a whole tensor ever exists.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from pixtral_cpp.backend._native import ggml_base_library
from pixtral_cpp.errors import QuantizationError

_WIDEN = {"BF16": "ggml_bf16_to_fp32_row", "F16": "ggml_fp16_to_fp32_row"}
_FLOAT_P = ctypes.POINTER(ctypes.c_float)


@functools.cache
def _functions() -> ctypes.CDLL:
    base = ggml_base_library()
    for name, restype, argtypes in (
        ("ggml_quantize_chunk", ctypes.c_size_t,
         [ctypes.c_int, _FLOAT_P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _FLOAT_P]),
        ("ggml_quantize_init", None, [ctypes.c_int]),
        ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
        ("ggml_validate_row_data", ctypes.c_bool, [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
        ("ggml_bf16_to_fp32_row", None, [ctypes.c_void_p, _FLOAT_P, ctypes.c_int64]),
        ("ggml_fp16_to_fp32_row", None, [ctypes.c_void_p, _FLOAT_P, ctypes.c_int64]),
    ):
        function = getattr(base, name)
        function.restype, function.argtypes = restype, argtypes
    return base


def row_bytes(out_type: Q, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[out_type]
    return n_per_row // block * size


class RowQuantizer:
    """Quantizes 2D row blocks with `threads` threads; reusable across tensors, close() when done."""

    # Rows per unit of work: enough to amortize the call, small enough to keep both cores busy to the end.
    ROWS_PER_TASK = 256

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        self._lib = _functions()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pixtral-cpp-quantize")

    def quantize(self, rows: np.ndarray, source_dtype: str, out_type: Q) -> np.ndarray:
        """`rows` (n_rows, n_per_row) in its storage dtype (BF16 as uint16, F16, F32) -> the bytes of
        `out_type`, row after row, exactly as llama.cpp's quantizer writes them."""
        if rows.ndim != 2:
            raise ValueError(f"expected 2D rows, got shape {rows.shape}")
        n_rows, n_per_row = rows.shape
        block, _ = GGML_QUANT_SIZES[out_type]
        if n_per_row % block:
            raise QuantizationError(f"rows of {n_per_row} values cannot be stored as {out_type.name} "
                                    f"(blocks of {block})")
        if self._lib.ggml_quantize_requires_imatrix(int(out_type)):
            raise QuantizationError(f"{out_type.name} needs an importance matrix")
        rows = np.ascontiguousarray(rows)
        self._lib.ggml_quantize_init(int(out_type))  # lookup tables of the IQ types, once, before threads race
        stride = row_bytes(out_type, n_per_row)
        out = np.empty(n_rows * stride, dtype=np.uint8)
        tasks = [self._pool.submit(self._quantize_span, rows, source_dtype, out_type, out, start,
                                   min(start + self.ROWS_PER_TASK, n_rows), stride)
                 for start in range(0, n_rows, self.ROWS_PER_TASK)]
        for task in tasks:
            task.result()
        return out

    def _quantize_span(self, rows: np.ndarray, source_dtype: str, out_type: Q, out: np.ndarray, start: int,
                       stop: int, stride: int) -> None:
        span = rows[start:stop]
        if source_dtype == "F32":
            values = np.ascontiguousarray(span, dtype=np.float32)
        elif source_dtype in _WIDEN:
            values = np.empty(span.shape, dtype=np.float32)
            getattr(self._lib, _WIDEN[source_dtype])(span.ctypes.data, values.ctypes.data_as(_FLOAT_P), span.size)
        else:
            raise QuantizationError(f"cannot quantize from storage dtype {source_dtype}")
        target = out[start * stride:stop * stride]
        written = self._lib.ggml_quantize_chunk(int(out_type), values.ctypes.data_as(_FLOAT_P), target.ctypes.data,
                                                0, stop - start, span.shape[1], None)
        if written != target.size or not self._lib.ggml_validate_row_data(int(out_type), target.ctypes.data,
                                                                           target.size):
            raise QuantizationError(f"ggml produced invalid {out_type.name} data (NaN or Inf in the weights?)")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RowQuantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
