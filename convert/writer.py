"""The streaming GGUF writer: header and metadata first, then tensors converted in row chunks.

Peak memory is one chunk (64 MB of float32, or its storage-dtype rows for ggml's quantizers) and its
output, whatever the checkpoint size; the source stays memory-mapped. While one tensor is converted,
the kernel is already reading the next one from disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from pixtral_cpp.backend.row_quantizer import RowQuantizer
from pixtral_cpp.convert.plan import PlannedTensor
from pixtral_cpp.convert.safetensors_reader import widen_to_float32
from pixtral_cpp.convert.source import Checkpoint
from pixtral_cpp.errors import TensorError

_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)

CHUNK_BYTES = 64 * 1024 * 1024  # of float32 per conversion step


def write_gguf(writer: gguf.GGUFWriter, path: str, checkpoint: Checkpoint, plan: list[PlannedTensor],
               quantizer: RowQuantizer | None = None, on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write `writer`'s metadata and the planned tensors to `path`, one chunk at a time. Quantized
    types need `quantizer` (ggml's own row quantizers)."""
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                               raw_dtype=tensor.out_type)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    try:
        for index, tensor in enumerate(plan):
            if index + 1 < len(plan):
                checkpoint.prefetch(plan[index + 1].source)
            writer.write_padding(fout, fout.tell())
            written = 0
            for chunk in encode_tensor(checkpoint, tensor, quantizer):
                fout.write(chunk.data)
                written += chunk.nbytes
                on_bytes(chunk.nbytes)
            checkpoint.release(tensor.source)
            if written != tensor.nbytes:  # a wrong size here would make llama.cpp read garbage offsets
                raise TensorError(f"internal error: {tensor.name} wrote {written} bytes, planned {tensor.nbytes}")
            writer.write_padding(fout, tensor.nbytes)
        fout.flush()
    finally:
        writer.close()


def encode_tensor(checkpoint: Checkpoint, tensor: PlannedTensor, quantizer: RowQuantizer | None = None
                  ) -> Iterator[np.ndarray]:
    """The tensor's GGUF bytes as contiguous arrays, in order."""
    raw = checkpoint.array(tensor.source)
    if tensor.row is not None:
        raw = raw[tensor.row]
    else:
        raw = tensor.transform(raw, checkpoint.config)
    rows = raw.reshape(1, -1) if raw.ndim < 2 else raw.reshape(raw.shape[0], -1)
    step = max(1, CHUNK_BYTES // (rows.shape[1] * 4))
    for start in range(0, rows.shape[0], step):
        yield np.ascontiguousarray(encode_rows(rows[start:start + step], tensor.source.dtype, tensor.out_type,
                                               quantizer))


def encode_rows(raw: np.ndarray, source_dtype: str, out_type: Q, quantizer: RowQuantizer | None = None
                ) -> np.ndarray:
    """Storage-dtype rows -> the bytes of `out_type` (bf16 -> BF16 is a bit-exact copy)."""
    if out_type not in _FLOAT_TYPES:
        if quantizer is None:
            raise TensorError(f"internal error: {out_type.name} needs a RowQuantizer")
        return quantizer.quantize(raw, source_dtype, out_type)
    if out_type == Q.BF16 and source_dtype == "BF16":
        return raw
    values = widen_to_float32(raw, source_dtype)
    if out_type == Q.F32:
        return values
    if out_type == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, out_type)  # BF16 from an F16/F32 checkpoint, rounded like ggml

