"""Decoding image files safely: only the raster formats Pixtral is meant for, chosen from the bytes.

Pillow ships some forty format plugins, and `Image.open` tries every one that recognises the data. Some
are dangerous on untrusted input: EPS hands the caller's PostScript to Ghostscript (a long history of
sandbox escapes), others are rarely exercised C decoders. Images reach us from server requests, batch
folders and the API, so we read the first bytes, match their magic number against the formats photos
and screenshots come in (PNG, JPEG, WebP, GIF, BMP, TIFF, and AVIF where this Pillow has it) and open
the data with `Image.open(fp, formats=[that one])`: no other plugin ever sees the bytes, whatever the
file is called. A refusal names the format when we recognise it (PostScript, PDF, SVG, ICO, PSD...).

Decoding is quiet: Pillow's Python warnings (corrupt EXIF, palette transparency, decompression bomb
zone) are suppressed, and what libtiff prints on file descriptor 2 is captured; it goes into the
ImageError when the decode fails and to the debug log otherwise.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import stat
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError, features

from pixtral_cpp.errors import ImageError
from pixtral_cpp.quiet_stderr import capture_stderr

logger = logging.getLogger(__name__)

HEAD_BYTES = 512  # enough for every magic number below, and for an SVG's XML prologue


@dataclass(frozen=True)
class Decoded:
    """A fully decoded image, EXIF orientation applied, and the size the file declares (oriented too).

    `original_size` equals `image.size` unless the decoder reduced the image while decoding.
    """

    image: Image.Image
    original_size: tuple[int, int]


# ---------------------------------------------------------------------------------------------------
# Which formats: magic numbers


def _is_avif(head: bytes) -> bool:
    """An ISO-BMFF `ftyp` box whose major or compatible brands say AVIF (HEIC uses the same box)."""
    if head[4:8] != b"ftyp":
        return False
    box_size = struct.unpack(">I", head[:4])[0]
    brands = head[8:12] + head[16:min(box_size, len(head))]
    return any(brands[i:i + 4] in (b"avif", b"avis") for i in range(0, len(brands) - 3, 4))


# (family as users name it, Pillow format ids to open it with, magic test): photos and screenshots.
_ACCEPTED: tuple[tuple[str, tuple[str, ...], Callable[[bytes], bool]], ...] = (
    ("PNG", ("PNG",), lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("JPEG", ("JPEG",), lambda h: h.startswith(b"\xff\xd8\xff")),  # Pillow gives multi-picture ones as MPO
    ("WebP", ("WEBP",), lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("GIF", ("GIF",), lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("BMP", ("BMP",), lambda h: h[:2] == b"BM"),
    ("TIFF", ("TIFF",), lambda h: h[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")),  # classic and BigTIFF
    ("AVIF", ("AVIF",), _is_avif),
)

# Magic numbers of formats we refuse, to say what the caller sent. Prefixes at offset 0.
_REFUSED_PREFIXES = (
    (b"%!PS", "PostScript (EPS)"),
    (b"\xc5\xd0\xd3\xc6", "PostScript (EPS)"),  # DOS EPS binary header
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\0\0\1\0", "Windows icon (ICO)"),
    (b"\0\0\2\0", "Windows cursor (CUR)"),
    (b"icns", "macOS icon (ICNS)"),
    (b"\0\0\0\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\0\0\0\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"DDS ", "DirectDraw Surface (DDS)"),
    (b"qoif", "QOI"),
    (b"\xd7\xcd\xc6\x9a", "Windows Metafile (WMF)"),
    (b"SIMPLE  =", "FITS"),
    (b"gimp xcf", "GIMP (XCF)"),
    (b"/* XPM */", "XPM"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


@functools.cache
def _accepted() -> tuple[tuple[str, tuple[str, ...], Callable[[bytes], bool]], ...]:
    """The accepted families this Pillow can decode (AVIF only where it was built in)."""
    return tuple(row for row in _ACCEPTED if row[0] != "AVIF" or features.check("avif"))


def accepted_formats() -> str:
    """The accepted formats in words: 'PNG, JPEG, WebP, GIF, BMP, TIFF and AVIF'."""
    names = [name for name, _, _ in _accepted()]
    return ", ".join(names[:-1]) + " and " + names[-1]


def accepted_family(head: bytes) -> tuple[str, tuple[str, ...]] | None:
    """(family, Pillow format ids) for data starting with `head`, or None when we do not decode it."""
    return next(((name, ids) for name, ids, matches in _accepted() if matches(head)), None)


def recognise_refused(head: bytes) -> str | None:
    """The name of a format we refuse, when its magic number says so."""
    for prefix, name in _REFUSED_PREFIXES:
        if head.startswith(prefix):
            return name
    if head[4:8] == b"ftyp":
        return "AVIF" if _is_avif(head) else "HEIF/HEIC" if head[8:12] in _HEIF_BRANDS else "ISO media (MP4/MOV)"
    if head[40:44] == b" EMF":
        return "Windows Enhanced Metafile (EMF)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if text.startswith(b"<?xml"):
        return "XML"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "Netpbm (PBM/PGM/PPM)"
    return None


def check_accepted(name: str, head: bytes) -> tuple[str, ...]:
    """The Pillow format ids to open data starting with `head` with; ImageError when we refuse it."""
    found = accepted_family(head)
    if found is not None:
        return found[1]
    if not head:
        raise ImageError(f"{name}: empty, not an image")
    refused = recognise_refused(head)
    if refused is not None:
        raise ImageError(f"{name}: {refused} is not an accepted image format; pixtral-cpp decodes "
                         f"{accepted_formats()}")
    raise ImageError(f"{name}: not an image format pixtral-cpp decodes ({accepted_formats()})")


def check_pil_image(name: str, image: Image.Image) -> None:
    """Refuse an app's PIL image that is still to be decoded by a plugin we would not use.

    Pixels already in memory are just pixels, whatever file they came from. But `Image.open` is lazy:
    an image opened by another plugin and not loaded yet would run that plugin's decoder in load()
    (Ghostscript for EPS), so it is refused; an app that trusts the file can call load() itself.
    """
    allowed = {pillow_id for _, ids, _ in _accepted() for pillow_id in ids} | {"MPO"}
    if image.format is not None and image.format not in allowed and getattr(image, "tile", None):
        raise ImageError(f"{name}: a {image.format} image not decoded yet; pixtral-cpp decodes only "
                         f"{accepted_formats()} (call image.load() first if you trust the file)")


# ---------------------------------------------------------------------------------------------------
# Paths


def display_name(path: str | os.PathLike[str]) -> str:
    """The path for a message: as is when printable, else escaped (NUL bytes, lone surrogates)."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else os.fsdecode(text)
    return text if text.isprintable() else ascii(text)


def open_image_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading; ImageError naming the problem for anything else.

    Opened non-blocking and checked with fstat on the open descriptor: a named pipe would make a
    plain open() wait forever for a writer, and a check before opening could be raced.
    """
    name = display_name(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except ValueError as exc:  # embedded NUL, or a name the file system encoding cannot express
        problem = "contains a NUL byte" if "\0" in os.fsdecode(path) else "cannot be encoded for the file system"
        raise ImageError(f"{name}: the path {problem}") from exc
    except OSError as exc:
        raise ImageError(f"{name}: {_open_failure(path, exc)}") from exc
    try:
        kind = _file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise ImageError(f"{name}: is a {kind}, not an image file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_failure(path: str | os.PathLike[str], exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links (a symlink loop?)"
    if isinstance(exc, (IsADirectoryError, PermissionError)) and os.path.isdir(path):
        return "is a folder, not an image file"  # Windows refuses to open folders
    if isinstance(exc, PermissionError):
        return "permission denied: the file is not readable"
    return f"cannot open the file ({exc.strerror or exc})"


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe (FIFO)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "special file"


# ---------------------------------------------------------------------------------------------------
# Decoding


def decode_file(name: str, fp: BinaryIO, max_pixels: int | None,
                keep_at_least: Callable[[int, int], tuple[int, int]] | None = None) -> Decoded:
    """Open encoded data with only the plugin its magic number names, and decode it (see decode_opened).

    Only the first HEAD_BYTES are read to choose; the plugins then read lazily, as far as they need.
    """
    head = fp.read(HEAD_BYTES)
    fp.seek(0)
    pillow_ids = check_accepted(name, head)
    if pillow_ids == ("WEBP",):
        # libwebp wants the whole file in memory and Pillow reads to the end: read only the RIFF body.
        fp = io.BytesIO(fp.read(8 + struct.unpack("<I", head[4:8])[0]))

    def run() -> Decoded:
        with Image.open(fp, formats=list(pillow_ids)) as image:
            return decode_opened(name, image, max_pixels, keep_at_least)
    return quietly(name, run, tiff=pillow_ids == ("TIFF",), max_pixels=max_pixels)


def quietly(name: str, run: Callable[[], Decoded], *, tiff: bool, max_pixels: int | None) -> Decoded:
    """Run a decode with Pillow's warnings silenced and, for TIFF, libtiff's stderr captured.

    Every failure becomes an ImageError; a failed TIFF's message carries libtiff's first complaint.
    """
    printed: list[str] = []
    try:
        with _pillow_warnings_silenced(), (capture_stderr() if tiff else nullcontext(printed)) as printed:
            result = run()
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise OSError, ValueError,
        # SyntaxError, EOFError, struct.error, zlib.error, MemoryError... for malformed input.
        raise _as_image_error(name, exc, max_pixels, printed) from exc
    if printed:
        logger.debug("%s: libtiff wrote while decoding: %s", name, printed[0].strip())
    return result


def _as_image_error(name: str, exc: Exception, max_pixels: int | None, printed: list[str]) -> ImageError:
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's hard limit, hit while reading the header
        pillow = str(exc).rstrip(".")
        ours = "" if max_pixels is None else f"; pixtral-cpp's limit is {max_pixels:,} pixels"
        return ImageError(f"{name}: refusing to decode a possible decompression bomb ({pillow}{ours})")
    if isinstance(exc, UnidentifiedImageError):  # the magic number matched but the header did not
        return ImageError(f"{name}: corrupt image: its header cannot be read")
    said = next((line.strip() for text in printed for line in text.splitlines() if line.strip()), "")
    libtiff = f"; libtiff: {said}" if said else ""
    return ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc}{libtiff})")


_warnings_lock = threading.Lock()
_warnings_users = 0
_warnings_filter: tuple[object, ...] | None = None


@contextmanager
def _pillow_warnings_silenced() -> Iterator[None]:
    """Ignore warnings raised from Pillow's modules while any thread decodes.

    warnings.catch_warnings is not thread-safe: two overlapping decodes would restore each other's
    filters and could leave "ignore" installed for good. So one filter is added by the first decode
    and removed by the last; meanwhile Pillow warnings from other threads are ignored too.
    """
    global _warnings_users, _warnings_filter
    with _warnings_lock:
        if _warnings_users == 0:
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            _warnings_filter = warnings.filters[0]
        _warnings_users += 1
    try:
        yield
    finally:
        with _warnings_lock:
            _warnings_users -= 1
            if _warnings_users == 0:
                if _warnings_filter in warnings.filters:
                    warnings.filters.remove(_warnings_filter)  # an "ignore" entry: no registry to reset
                _warnings_filter = None


# ---------------------------------------------------------------------------------------------------
# From an opened image to RGB pixels

# Pillow modes holding 16-bit samples in a wider container; scaled to 8 bits, not clipped.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (ImageOps.exif_transpose's table).
_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_DCT_SCALED = frozenset({"JPEG", "MPO"})


def decode_opened(name: str, image: Image.Image, max_pixels: int | None,
                  keep_at_least: Callable[[int, int], tuple[int, int]] | None = None) -> Decoded:
    """Size-check, fully decode and orient an opened image (first frame only) into 8-bit RGB.

    With `keep_at_least` (upright width, height -> the smallest upright size wanted), a JPEG is decoded
    at the coarsest DCT scale (1/2, 1/4, 1/8) that keeps each side at least that large.
    """
    check_pixel_count(name, image.size, max_pixels)
    orientation = None
    original = None
    if keep_at_least is not None and image.format in _DCT_SCALED and getattr(image, "tile", None):
        orientation = exif_orientation(name, image)  # JPEG's EXIF sits in the header: no decoding needed
        original = _upright(image.size, orientation)
        wanted = _upright(keep_at_least(*original), orientation)  # back to the file's orientation
        image.draft(None, wanted)
    image.load()  # decode everything here (only the first frame), so a truncated file fails now
    if orientation is None:
        orientation = exif_orientation(name, image)
    if orientation in _TRANSPOSES:
        image = image.transpose(_TRANSPOSES[orientation])
    return Decoded(to_rgb(image), original or image.size)


def exif_orientation(name: str, image: Image.Image) -> int:
    """The EXIF orientation 1..8; 1 (as stored) when it is missing, invalid or the EXIF is corrupt.

    A photo with damaged EXIF should still be described, so an unreadable orientation is logged, not raised.
    """
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as exc:  # noqa: BLE001 - Pillow's EXIF parser raises many kinds on bad data
        logger.debug("%s: EXIF unreadable (%s: %s); orientation ignored", name, type(exc).__name__, exc)
        return 1
    if isinstance(value, int) and 1 <= value <= 8:
        return value
    logger.debug("%s: EXIF orientation %r is not 1..8; ignored", name, value)
    return 1


def _upright(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _SWAPS_SIDES else size


def check_pixel_count(name: str, size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse an image without pixels or over `max_pixels`, from its header size alone."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{name}: image is {width}x{height} = {width * height:,} pixels, over the limit "
                         f"of {max_pixels:,} (raise max_pixels if you trust this image)")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent areas become white like mistral-common's _convert_to_rgb."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = Image.fromarray(to_uint8(np.asarray(image)))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        # mistral-common pastes RGBA onto white with the alpha as mask; same call, same rounding.
        background = Image.new("RGBA", rgba.size, "white")
        background.paste(rgba, (0, 0), rgba)
        return background.convert("RGB")
    return image.convert("RGB")  # a copy even for RGB, so the result never shares the caller's image


def to_uint8(samples: np.ndarray) -> np.ndarray:
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
