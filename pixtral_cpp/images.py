"""Image loading and Pixtral's image geometry, matching mistral-common's preprocessing.

Pixtral sees an image as a grid of 16x16 patches. mistral-common (tokens/tokenizers/image.py,
`ImageEncoder`) scales the longest edge down to at most 1024 px, rounds each side *up* to a multiple of
16 and stretches the image to exactly that size with OpenCV's bicubic filter. llama.cpp's mtmd does
something else by default (docs/runtime-notes.md §2), so we hand mtmd pixels that are already at the
final size: mtmd then leaves them alone and the token count matches the reference.

Encoded images are decoded by pixtral_cpp.image_decode: only PNG, JPEG, WebP, GIF, BMP and TIFF (and
AVIF where Pillow has it), the formats photos and screenshots come in, chosen from the first bytes and
opened with that one Pillow plugin; EPS, PDF, SVG and the rest are refused by name, so no other plugin
(EPS runs Ghostscript) ever sees untrusted bytes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pixtral_cpp.errors import ImageError
from pixtral_cpp.image_decode import (
    Decoded,
    check_pil_image,
    check_pixel_count,
    decode_file,
    decode_opened,
    display_name,
    open_image_file,
    quietly,
    to_rgb,
    to_uint8,
)

PATCH_SIZE = 16  # Pixtral-12B vision_encoder.patch_size
MAX_IMAGE_SIZE = 1024  # Pixtral-12B vision_encoder.image_size; its 2D RoPE table covers 64 patches a side
DEFAULT_MAX_PIXELS = 50_000_000  # refuse larger images before decoding them (decompression bombs)

# reduce_while_decoding keeps each side at least this many times the final grid. Measured on photo-like
# JPEGs (smooth colour fields, stripes, noise of sd 20; quality 90), prepare_image at 1024, one core:
#   8000x6000 -> decoded at 1/2 (4000x3000): 2.1 s -> 1.1 s, peak RSS 610 -> 256 MiB; same 64x48 grid;
#     prepared pixels differ by 7.2 grey levels on average, 60 at most (p99 26): the exact path samples
#     the noise without antialiasing (as mistral-common does), the DCT scaling averages it first.
#   4000x3000 is not reduced at this margin (1/2 would leave 2000 < 2 x 1024); at margin 1 it would be:
#     0.47 -> 0.22 s, numpy peak 140 -> 61 MiB, the same 7.2 mean difference.
REDUCTION_MARGIN = 2

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
_ARRAY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_ARRAY_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.bool_, np.float16, np.float32,
                                                 np.float64))


@dataclass(frozen=True)
class ImageGeometry:
    """Where one image lands: original size, size after the budget, and its patch grid."""

    original: tuple[int, int]  # (width, height) as loaded, after EXIF orientation
    resized: tuple[int, int]  # (width, height) after the max_image_size limit, before rounding up
    cols: int  # patches per row
    rows: int  # rows of patches
    patch_size: int = PATCH_SIZE

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the pixels the vision encoder sees: the grid times the patch size."""
        return self.cols * self.patch_size, self.rows * self.patch_size

    @property
    def patches(self) -> int:
        """Patch embeddings the vision encoder produces."""
        return self.rows * self.cols

    @property
    def n_image_positions(self) -> int:
        """Prompt positions of the image: each row's patches plus its [IMG_BREAK] or final [IMG_END]."""
        return self.rows * (self.cols + 1)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image at its final size, ready for the vision encoder."""

    pixels: np.ndarray = field(repr=False)  # (rows*16, cols*16, 3) uint8, C-contiguous
    geometry: ImageGeometry


# ---------------------------------------------------------------------------------------------------
# Geometry


def check_max_image_size(max_image_size: int, patch_size: int = PATCH_SIZE) -> None:
    """Refuse a budget that is not a multiple of the patch size within [patch_size, 1024]."""
    if (not isinstance(max_image_size, int) or isinstance(max_image_size, bool)
            or not patch_size <= max_image_size <= MAX_IMAGE_SIZE or max_image_size % patch_size):
        raise ImageError(f"max_image_size must be a multiple of {patch_size} between {patch_size} and "
                         f"{MAX_IMAGE_SIZE} (Pixtral's limit), got {max_image_size!r}")


def pixtral_geometry(width: int, height: int, max_image_size: int = MAX_IMAGE_SIZE,
                     patch_size: int = PATCH_SIZE) -> ImageGeometry:
    """The patch grid mistral-common's ImageEncoder gives a width x height image."""
    check_max_image_size(max_image_size, patch_size)
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ImageError(f"image {name} must be a positive integer, got {value!r}")
    w, h = int(width), int(height)
    # Same float expressions as ImageEncoder._image_to_num_tokens: Python's round() (half to even), and
    # at least 1 px so an extreme aspect ratio keeps its short side. transformers floors instead.
    ratio = max(h / max_image_size, w / max_image_size)
    if ratio > 1:
        w = max(round(w / ratio), 1)
        h = max(round(h / ratio), 1)
    cols = (w - 1) // patch_size + 1
    rows = (h - 1) // patch_size + 1
    return ImageGeometry(original=(int(width), int(height)), resized=(w, h), cols=cols, rows=rows,
                         patch_size=patch_size)


def max_image_tokens(max_image_size: int = MAX_IMAGE_SIZE) -> int:
    """Prompt positions of the largest image a budget allows (a square one): 4160 at 1024."""
    return pixtral_geometry(max_image_size, max_image_size, max_image_size).n_image_positions


# ---------------------------------------------------------------------------------------------------
# Loading


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               reduce_while_decoding: bool = False) -> Image.Image:
    """Decode a path, encoded bytes, a PIL image or a numpy array into an 8-bit RGB PIL image.

    Encoded data must be PNG, JPEG, WebP, GIF, BMP or TIFF (and AVIF where Pillow has it), told from
    its first bytes; other formats are refused by name (pixtral_cpp.image_decode says why). A PIL image
    of another format is accepted only once its pixels are loaded. EXIF orientation is applied
    (mistral-common does not; unreadable EXIF is ignored), animations give their first frame,
    transparency is composited onto white (as mistral-common does), 16-bit samples are scaled to 8
    bits (1/257; Pillow's float mode F is taken as 0..1). Arrays: (H, W), (H, W, 1|2|3|4) as gray,
    gray+alpha, RGB, RGBA; uint8 as is, uint16 scaled by 1/257, bool as 0/255, float as 0..1
    (clipped). Images over `max_pixels` are refused before any pixel is decoded (None: only Pillow's
    own limit, 2 x Image.MAX_IMAGE_PIXELS, applies). `reduce_while_decoding`: see prepare_image; the
    image then comes back smaller than the file. Every failure raises ImageError.
    """
    keep = _reduction_floor(MAX_IMAGE_SIZE) if reduce_while_decoding else None
    return _load(source, max_pixels, keep).image


def _load(source: ImageSource, max_pixels: int | None,
          keep_at_least: Callable[[int, int], tuple[int, int]] | None) -> Decoded:
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool)
                                   or max_pixels < 1):
        raise ImageError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    if isinstance(source, np.ndarray):
        return quietly("<array>", lambda: _decoded_array(source, max_pixels), tiff=False, max_pixels=max_pixels)
    if isinstance(source, Image.Image):  # the caller's to close; decoded in place if still lazy
        check_pil_image("<PIL image>", source)
        return quietly("<PIL image>", lambda: decode_opened("<PIL image>", source, max_pixels),
                       tiff=source.format == "TIFF", max_pixels=max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_file("<bytes>", io.BytesIO(bytes(source)), max_pixels, keep_at_least)
    if isinstance(source, (str, os.PathLike)):
        with open_image_file(source) as fp:
            return decode_file(display_name(source), fp, max_pixels, keep_at_least)
    raise ImageError(f"cannot read an image from a {type(source).__name__}: pass a path, bytes, "
                     "a PIL image or a numpy array")


def _decoded_array(array: np.ndarray, max_pixels: int | None) -> Decoded:
    image = to_rgb(_image_from_array(array, max_pixels))
    return Decoded(image, image.size)


def _image_from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    """A PIL image from (H, W) or (H, W, C) samples; checks the size before converting anything."""
    if array.ndim == 3 and array.shape[2] in _ARRAY_CHANNELS:
        channels = array.shape[2]
    elif array.ndim == 2:
        channels = 1
    else:
        raise ImageError(f"image array must be (H, W) or (H, W, C) with C in 1..4, got shape {array.shape}")
    if array.dtype not in _ARRAY_DTYPES:
        # Signed or 32/64-bit integers are refused: np.array(...) of 0..255 values is int64, and
        # guessing its range would silently darken or saturate the image.
        raise ImageError(f"unsupported image array dtype {array.dtype}: use uint8 (0..255), uint16 "
                         "(0..65535), bool, or float (0..1)")
    check_pixel_count("<array>", (array.shape[1], array.shape[0]), max_pixels)
    samples = to_uint8(array)
    if channels == 1:
        samples = samples.reshape(array.shape[:2])
    image = Image.fromarray(np.ascontiguousarray(samples))
    assert image.mode == _ARRAY_CHANNELS[channels], image.mode
    return image


# ---------------------------------------------------------------------------------------------------
# Resizing


def prepare_image(source: ImageSource, *, max_image_size: int = MAX_IMAGE_SIZE,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_while_decoding: bool = False) -> PreparedImage:
    """Load an image and stretch it to Pixtral's patch grid exactly as mistral-common does.

    `reduce_while_decoding` (off by default: the library and CLI stay exact) lets a JPEG decode at the
    coarsest DCT scale (1/2, 1/4, 1/8) that keeps each side at least twice the final grid: less memory
    and time for huge photos, the same geometry and token count (taken from the file's own size), and
    pixels close to the exact path. Figures at REDUCTION_MARGIN.
    """
    check_max_image_size(max_image_size)
    keep = _reduction_floor(max_image_size) if reduce_while_decoding else None
    loaded = _load(source, max_pixels, keep)
    geometry = pixtral_geometry(*loaded.original_size, max_image_size)
    pixels = resize_bicubic(np.asarray(loaded.image), geometry.size)
    return PreparedImage(pixels=pixels, geometry=geometry)


def _reduction_floor(max_image_size: int) -> Callable[[int, int], tuple[int, int]]:
    """For an upright width x height: the size each side must keep while decoding, twice the grid."""
    def floor(width: int, height: int) -> tuple[int, int]:
        grid_width, grid_height = pixtral_geometry(width, height, max_image_size).size
        return REDUCTION_MARGIN * grid_width, REDUCTION_MARGIN * grid_height
    return floor


def resize_bicubic(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, C) uint8 to size=(width, height) like OpenCV's INTER_CUBIC, rounded to uint8.

    mistral-common calls cv2.resize(float32 image, INTER_CUBIC). OpenCV is not a dependency of ours,
    and Pillow's BICUBIC differs (a = -0.5, antialiased when shrinking), so this reimplements OpenCV's
    filter: Keys kernel with a = -0.75, half-pixel centres, replicated borders, no antialiasing,
    horizontal pass then vertical, float32 sums. Measured against mistral-common: within 0.5 grey
    levels wherever its float result lies in 0..255 (about 1e-5 of the pixels sit on a .5 tie and
    round the other way); the reference's bicubic overshoot past 0..255 is clipped here.
    """
    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return np.ascontiguousarray(pixels)  # cv2.resize copies when the size is unchanged
    x_index, x_weight = _cubic_taps(width, size[0])
    y_index, y_weight = _cubic_taps(height, size[1])
    rows = np.zeros((height, size[0], pixels.shape[2]), np.float32)
    for k in range(4):
        rows += x_weight[:, k, None] * pixels[:, x_index[:, k]].astype(np.float32)
    out = np.zeros((size[1], size[0], pixels.shape[2]), np.float32)
    for k in range(4):
        out += y_weight[:, k, None, None] * rows[y_index[:, k]]
    # The reference keeps floats (overshoot past 0..255 included); mtmd takes bytes, so we round.
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _keys_kernel(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (1981) for distances in [0, 2); a = -0.75 is OpenCV's INTER_CUBIC."""
    x = np.abs(distance)
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    return np.where(x <= 1, near, far)


def _cubic_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (dst, 4) and float32 weights (dst, 4) of OpenCV's cubic resize along one axis."""
    scale = 1.0 / (dst / src)  # cv::resize keeps dst/src and inverts it; same double, same floors
    # Positions and weights in double: that matches OpenCV (5.0) to 1e-4; float32 positions are off
    # by up to 0.01 grey levels on 1000-px rows.
    position = (np.arange(dst) + 0.5) * scale - 0.5
    start = np.floor(position)
    t = position - start
    # The four taps sit at distances 1+t, t, 1-t and 2-t; the last weight closes the sum to exactly 1.
    w0, w1, w2 = _keys_kernel(1 + t), _keys_kernel(t), _keys_kernel(1 - t)
    w3 = 1 - w0 - w1 - w2
    index = np.clip(start.astype(np.int64)[:, None] + np.arange(-1, 3), 0, src - 1)
    return index, np.stack([w0, w1, w2, w3], axis=1).astype(np.float32)
