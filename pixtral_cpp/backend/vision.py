"""Pixtral image encoding through libmtmd, with the [IMG_BREAK] rows repaired."""

from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from pixtral_cpp.backend._native import bindings, is_gguf, last_native_error
from pixtral_cpp.backend.text import FLASH_ATTN, TextModel
from pixtral_cpp.errors import BackendError, ImageError, ModelError
from pixtral_cpp.gguf_file import read_gguf_header

IMG_BREAK_TENSOR = "v.token_embd.img_break"


@dataclass(frozen=True)
class ImageEmbedding:
    """One image as the text model sees it: ``rows`` rows of ``cols`` patch vectors, [IMG_BREAK] between rows."""

    embeddings: np.ndarray  # (rows * (cols + 1) - 1, n_embd) float32; [IMG_END] is a text token after it
    rows: int
    cols: int

    @property
    def n_positions(self) -> int:
        """Text-context positions the embeddings occupy (one per row, [IMG_END] not included)."""
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class _MmprojInfo:
    patch_size: int
    img_break: np.ndarray  # (n_embd,) float32


class VisionContext:
    """Owns an ``mtmd_context`` for a Pixtral mmproj bound to ``text_model``; frees it on :meth:`close`."""

    def __init__(
        self,
        mmproj_path: Path,
        text_model: TextModel,
        *,
        threads: int | None = None,
        use_gpu: bool = False,
        image_min_tokens: int = 1,
        image_max_tokens: int = 4096,  # Pixtral's own limit: 1024 px per side = 64 x 64 patches
        flash_attn: str = "auto",
    ) -> None:
        self.path = Path(mmproj_path)
        self.text_model = text_model
        self.image_min_tokens, self.image_max_tokens = image_min_tokens, image_max_tokens
        self._llama, self._mtmd = bindings()
        self._info = _read_mmproj(self.path, text_model.n_embd)
        self._ctx = self._init_mtmd(threads or os.cpu_count() or 1, use_gpu, FLASH_ATTN[flash_attn])
        self._finalizer = weakref.finalize(self, self._mtmd.mtmd_free, self._ctx)
        text_model._register_dependent(self)
        self._check_pixtral()

    @property
    def patch_size(self) -> int:
        return self._info.patch_size

    def _init_mtmd(self, threads: int, use_gpu: bool, flash_attn: int) -> int:
        model, _ = self.text_model._handles()
        params = self._mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = threads
        params.print_timings = False
        params.flash_attn_type = flash_attn
        params.image_min_tokens = self.image_min_tokens
        params.image_max_tokens = self.image_max_tokens
        ctx = self._mtmd.mtmd_init_from_file(bytes(self.path), model, params)
        if not ctx:
            raise ModelError(f"libmtmd could not load the mmproj {self.path}: {last_native_error()}")
        return ctx

    def _check_pixtral(self) -> None:
        if not self._mtmd.mtmd_support_vision(self._ctx) or self._mtmd.mtmd_decode_use_mrope(self._ctx):
            self.close()
            raise ModelError(f"{self.path} is not a Pixtral vision projector (no vision or M-RoPE positions)")

    def close(self) -> None:
        """Free the mtmd context (idempotent)."""
        self._finalizer()

    def __enter__(self) -> VisionContext:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- encoding --------------------------------------------------------------------------------------

    def encode_rgb(self, pixels: np.ndarray) -> ImageEmbedding:
        """Embed an RGB image (H, W, 3) uint8 whose sides are multiples of the patch size, unresized."""
        rows, cols = self._grid(pixels)
        embeddings = self._encode_raw(pixels)
        expected = rows * (cols + 1) - 1
        if embeddings.shape[0] != expected:
            raise ImageError(
                f"libmtmd resized the {pixels.shape[1]}x{pixels.shape[0]} image ({embeddings.shape[0]} "
                f"embeddings, expected {expected}); resize it to the Pixtral grid before encoding"
            )
        # libmtmd builds these rows as 0 * (uninitialised memory) + img_break, which gives NaN whenever
        # the reused buffer held NaN/Inf bits; write the vector ourselves (rows cols, 2*cols+1, ...).
        embeddings[cols :: cols + 1] = self._info.img_break
        bad = ~np.isfinite(embeddings)
        if bad.any():
            raise BackendError(
                f"the vision encoder produced {int(bad.sum())} non-finite values in rows "
                f"{np.unique(np.nonzero(bad)[0])[:10].tolist()}; the mmproj {self.path} may be corrupt"
            )
        return ImageEmbedding(embeddings, rows, cols)

    def _grid(self, pixels: np.ndarray) -> tuple[int, int]:
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ImageError("an image must be a numpy uint8 array of shape (height, width, 3)")
        height, width, _ = pixels.shape
        p = self.patch_size
        if height == 0 or width == 0 or height % p or width % p:
            raise ImageError(f"image sides must be non-zero multiples of {p} px, got {width}x{height}")
        rows, cols = height // p, width // p
        if not self.image_min_tokens <= rows * cols <= self.image_max_tokens:
            raise ImageError(
                f"a {width}x{height} image has {rows * cols} patches, outside "
                f"[{self.image_min_tokens}, {self.image_max_tokens}]; resize it or change the limits"
            )
        return rows, cols

    def _encode_raw(self, pixels: np.ndarray) -> np.ndarray:
        """libmtmd's output for one image as is, (n_tokens, n_embd) float32 (no [IMG_BREAK] repair)."""
        if self._finalizer.alive is False:
            raise BackendError(f"the vision context for {self.path} is closed")
        mtmd = self._mtmd
        data = np.ascontiguousarray(pixels, dtype=np.uint8)
        height, width, _ = data.shape
        bitmap = mtmd.mtmd_bitmap_init(width, height, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        if not bitmap:
            raise BackendError(f"libmtmd could not create a {width}x{height} bitmap")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            chunk = self._image_chunk(chunks, bitmap)
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
                raise BackendError(f"libmtmd could not encode the image: {last_native_error()}")
            out = mtmd.mtmd_get_output_embd(self._ctx)
            if not out:
                raise BackendError("libmtmd returned no image embeddings")
            shape = (n_tokens, self.text_model.n_embd)
            return np.ctypeslib.as_array(out, shape=shape).copy()  # the buffer is reused by the next encode
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _image_chunk(self, chunks: int, bitmap: int) -> int:
        """Tokenize a prompt holding only the media marker and return its image chunk (owned by chunks)."""
        mtmd = self._mtmd
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
        if status != 0:
            raise BackendError(f"libmtmd could not preprocess the image (status {status}): {last_native_error()}")
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk
        raise BackendError("libmtmd returned no image chunk for the image")


def _read_mmproj(path: Path, n_embd: int) -> _MmprojInfo:
    """Check the mmproj is Pixtral's and read the patch size and the [IMG_BREAK] vector once."""
    if not path.is_file() or not is_gguf(path):
        raise ModelError(f"mmproj {path} does not exist or is not a GGUF file")
    header = read_gguf_header(path)
    projector = header.get(gguf.Keys.Clip.PROJECTOR_TYPE)
    if projector != "pixtral":
        raise ModelError(f"{path} has projector type {projector!r}, not 'pixtral'")
    patch_size = header.get(gguf.Keys.ClipVision.PATCH_SIZE)
    if type(patch_size) is not int or patch_size <= 0:
        raise ModelError(f"{path}: {gguf.Keys.ClipVision.PATCH_SIZE} is {patch_size!r}, not a positive integer")
    tensor = header.tensors.get(IMG_BREAK_TENSOR)
    if tensor is None:
        raise ModelError(f"{path} lacks the tensor {IMG_BREAK_TENSOR}; `pixtral-cpp fix` adds it from the text model")
    raw = header.tensor_data(IMG_BREAK_TENSOR)
    vector = gguf.quants.dequantize(raw, tensor.type).astype(np.float32).reshape(-1)
    if vector.shape != (n_embd,) or not np.isfinite(vector).all():
        raise ModelError(f"{IMG_BREAK_TENSOR} in {path} has {vector.size} values (need {n_embd}, all finite)")
    return _MmprojInfo(patch_size, vector)
