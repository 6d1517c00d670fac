"""Image loading and Pixtral's image geometry, matching mistral-common's preprocessing.

Pixtral sees an image as a grid of 16x16 patches. mistral-common (tokens/tokenizers/image.py,
`ImageEncoder`) scales the longest edge down to at most 1024 px, rounds each side *up* to a multiple of
16 and stretches the image to exactly that size with OpenCV's bicubic filter. llama.cpp's mtmd does
something else by default (docs/runtime-findings.md §2), so we hand mtmd pixels that are already at the
final size: mtmd then leaves them alone and the token count matches the reference.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixtral_cpp.errors import ImageError

PATCH_SIZE = 16  # Pixtral-12B vision_encoder.patch_size
MAX_IMAGE_SIZE = 1024  # Pixtral-12B vision_encoder.image_size; its 2D RoPE table covers 64 patches a side
DEFAULT_MAX_PIXELS = 50_000_000  # refuse larger images before decoding them (decompression bombs)

ImageSource = str | os.PathLike[str] | bytes | bytearray | Image.Image | np.ndarray

# Pillow modes holding 16-bit samples in a wider container; scaled to 8 bits, not clipped.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
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


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a path, encoded bytes, a PIL image or a numpy array into an 8-bit RGB PIL image.

    EXIF orientation is applied (mistral-common does not), animations give their first frame,
    transparency is composited onto white (as mistral-common does), 16-bit samples are scaled to 8
    bits (1/257; Pillow's float mode F is taken as 0..1). Arrays: (H, W), (H, W, 1|2|3|4) as gray,
    gray+alpha, RGB, RGBA; uint8 as is, uint16 scaled by 1/257, bool as 0/255, float as 0..1
    (clipped). Images over `max_pixels` are refused before any pixel is decoded (None: only Pillow's
    own limit, 2 x Image.MAX_IMAGE_PIXELS, applies). Every failure raises ImageError.
    """
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool)
                                   or max_pixels < 1):
        raise ImageError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    if isinstance(source, np.ndarray):
        return _decode("<array>", lambda: nullcontext(_image_from_array(source, max_pixels)), max_pixels)
    if isinstance(source, Image.Image):
        return _decode("<PIL image>", lambda: nullcontext(source), max_pixels)  # the caller's to close
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode("<bytes>", lambda: Image.open(io.BytesIO(data)), max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            reason = "is not a file" if path.exists() else "no such file"
            raise ImageError(f"{path}: {reason}")
        return _decode(str(path), lambda: Image.open(path), max_pixels)
    raise ImageError(f"cannot read an image from a {type(source).__name__}: pass a path, bytes, "
                     "a PIL image or a numpy array")


def _decode(name: str, opener: Callable[[], AbstractContextManager[Image.Image]],
            max_pixels: int | None) -> Image.Image:
    """Open, size-check, fully decode and normalise one image, turning every failure into ImageError."""
    try:
        with warnings.catch_warnings():
            # Our own limit decides; Pillow's warning zone (89-179 MP) would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as image:
                _check_pixel_count(name, image.size, max_pixels)
                image.load()  # decode everything here, so a truncated file fails now and not later
                return _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's hard limit, hit while reading the header
        pillow = str(exc).rstrip(".")
        ours = "" if max_pixels is None else f"; pixtral-cpp's limit is {max_pixels:,} pixels"
        raise ImageError(f"{name}: refusing to decode a possible decompression bomb ({pillow}{ours})"
                         ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image format Pillow can read (empty, corrupt or not an "
                         "image)") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise OSError, ValueError,
        # SyntaxError, EOFError, struct.error, zlib.error, MemoryError... for malformed input.
        raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def _check_pixel_count(name: str, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{name}: image is {width}x{height} = {width * height:,} pixels, over the limit "
                         f"of {max_pixels:,} (raise max_pixels if you trust this image)")


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent areas become white like mistral-common's _convert_to_rgb."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        # mistral-common pastes RGBA onto white with the alpha as mask; same call, same rounding.
        background = Image.new("RGBA", rgba.size, "white")
        background.paste(rgba, (0, 0), rgba)
        return background.convert("RGB")
    return image.convert("RGB")  # a copy even for RGB, so the result never shares the caller's image


def _to_uint8(samples: np.ndarray) -> np.ndarray:
    """8-bit samples: uint8 as is, bool as 0/255, float as 0..1 (clipped), other integers as 16-bit.

    Pillow's I;16 and I modes hold 16-bit PNG/TIFF samples, so they are scaled by 1/257 (65535 -> 255)
    where Pillow's own convert("L") would clip everything above 255 to white.
    """
    if samples.dtype == np.uint8:
        return samples
    if samples.dtype == np.bool_:
        return samples.astype(np.uint8) * 255
    if samples.dtype.kind in "ui":
        wide = np.clip(samples.astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257): 65535 -> 255
    if samples.dtype.kind == "f":
        if not np.isfinite(samples).all():
            raise ImageError("image array contains NaN or infinite values")
        return np.rint(np.clip(samples.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ImageError(f"unsupported image array dtype {samples.dtype}: use uint8, uint16, bool or float")


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
    _check_pixel_count("<array>", (array.shape[1], array.shape[0]), max_pixels)
    samples = _to_uint8(array)
    if channels == 1:
        samples = samples.reshape(array.shape[:2])
    image = Image.fromarray(np.ascontiguousarray(samples))
    assert image.mode == _ARRAY_CHANNELS[channels], image.mode
    return image


# ---------------------------------------------------------------------------------------------------
# Resizing


def prepare_image(source: ImageSource, *, max_image_size: int = MAX_IMAGE_SIZE,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Load an image and stretch it to Pixtral's patch grid exactly as mistral-common does."""
    check_max_image_size(max_image_size)
    image = load_image(source, max_pixels=max_pixels)
    geometry = pixtral_geometry(image.width, image.height, max_image_size)
    pixels = resize_bicubic(np.asarray(image), geometry.size)
    return PreparedImage(pixels=pixels, geometry=geometry)


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
