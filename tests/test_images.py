"""Image loading and geometry match mistral-common's ImageEncoder; bad or hostile files fail cleanly."""

from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zlib
from pathlib import Path

import mistral_common
import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers.image import (
    DATASET_MEAN,
    DATASET_STD,
    ImageConfig,
    ImageEncoder,
    ImageEncoding,
    SpecialImageIDs,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from pixtral_cpp.errors import ImageError
from pixtral_cpp.images import (
    ImageGeometry,
    load_image,
    max_image_tokens,
    pixtral_geometry,
    prepare_image,
    resize_bicubic,
)
from pixtral_cpp.quiet_stderr import capture_stderr

SIZES = [(1, 1), (15, 15), (16, 16), (17, 17), (33, 700), (200, 150), (640, 480), (1000, 600), (1023, 1025),
         (1024, 768), (1024, 1024), (2048, 512), (4000, 100), (100, 4000), (3000, 2000), (1025, 1),
         (2048, 65), (1, 5000)]
IMG, IMG_BREAK, IMG_END = 10, 12, 13
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def mc_encoder() -> ImageEncoder:
    """The image encoder of the real Pixtral tokenizer file shipped with mistral-common."""
    tekken = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    encoder = MistralTokenizer.from_file(str(tekken)).instruct_tokenizer.image_encoder
    assert encoder is not None and encoder.special_ids == SpecialImageIDs(IMG, IMG_BREAK, IMG_END)
    return encoder


def mc_grid(encoding: ImageEncoding) -> tuple[int, int, int]:
    """(cols, rows, positions) read back from mistral-common's [IMG]/[IMG_BREAK]/[IMG_END] tokens."""
    tokens = encoding.tokens
    assert set(tokens) <= {IMG, IMG_BREAK, IMG_END} and tokens[-1] == IMG_END and tokens.count(IMG_END) == 1
    rows = tokens.count(IMG_BREAK) + 1
    cols = tokens.index(IMG_BREAK) if IMG_BREAK in tokens else len(tokens) - 1
    return cols, rows, len(tokens)


def mc_pixels(encoder: ImageEncoder, image: Image.Image) -> np.ndarray:
    """mistral-common's preprocessed image, un-normalised back to (H, W, 3) grey levels (float)."""
    chw = encoder(ImageChunk(image=image)).image
    return (chw.transpose(1, 2, 0) * np.float32(DATASET_STD) + np.float32(DATASET_MEAN)) * 255.0


def assert_geometry_invariants(g: ImageGeometry, max_image_size: int) -> None:
    assert g.n_image_positions == g.rows * (g.cols + 1) and g.patches == g.rows * g.cols
    assert 1 <= g.cols <= max_image_size // 16 and 1 <= g.rows <= max_image_size // 16
    assert g.size == (g.cols * 16, g.rows * 16) and max(g.resized) <= max_image_size


# --- geometry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_image_size", [1024, 512])
def test_grid_matches_mistral_common(mc_encoder: ImageEncoder, max_image_size: int) -> None:
    encoder = mc_encoder if max_image_size == 1024 else ImageEncoder(
        ImageConfig(16, max_image_size), mc_encoder.special_ids)
    for width, height in SIZES:
        g = pixtral_geometry(width, height, max_image_size)
        encoding = encoder(ImageChunk(image=Image.new("L", (width, height))))
        assert (g.cols, g.rows, g.n_image_positions) == mc_grid(encoding), (width, height)
        assert encoding.image.shape == (3, g.size[1], g.size[0]), (width, height)
        assert g.original == (width, height)
        assert_geometry_invariants(g, max_image_size)


def test_documented_token_counts() -> None:
    assert pixtral_geometry(1024, 768).n_image_positions == 3120  # docs/runtime-notes.md §2
    assert pixtral_geometry(200, 150).n_image_positions == 140
    assert max_image_tokens() == 64 * 65 and max_image_tokens(512) == 32 * 33 and max_image_tokens(16) == 2


def test_downscale_uses_bankers_rounding() -> None:
    # 2048x65 halves to 1024x32.5: Python's round() gives 32 (2 rows); rounding half up would give 33
    # (3 rows). mistral-common's count (checked in the test above) is 2 rows.
    g = pixtral_geometry(2048, 65)
    assert g.resized == (1024, 32) and (g.cols, g.rows) == (64, 2)
    assert pixtral_geometry(4000, 1).resized == (1024, 1)  # never rounds a side to 0
    assert pixtral_geometry(1024, 1024).resized == (1024, 1024)  # at the limit: not scaled


@pytest.mark.parametrize("bad", [0, 8, 1000, 1040, 2048, True, 1024.0, None])
def test_bad_budget_is_refused(bad: object) -> None:
    with pytest.raises(ImageError, match="max_image_size must be a multiple of 16"):
        pixtral_geometry(100, 100, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (1.5, 10)])
def test_bad_dimensions_are_refused(size: tuple[float, float]) -> None:
    with pytest.raises(ImageError, match="must be a positive integer"):
        pixtral_geometry(*size)  # type: ignore[arg-type]


# --- pixels against mistral-common ----------------------------------------------------------------


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with hard edges and noise: overshoot, ringing and aliasing all show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(5 * (x + y))], -1) * 100 + 128
    base[(x * 40).astype(int) % 2 == 0] += 60  # stripes of 1/40 of the long side
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(200, 150), (17, 33), (1000, 600), (1500, 1100), (4000, 90)])
def test_pixels_match_mistral_common(mc_encoder: ImageEncoder, size: tuple[int, int]) -> None:
    image = photo_like(*size, seed=sum(size))
    prepared = prepare_image(image)
    reference = mc_pixels(mc_encoder, image)
    ours = prepared.pixels.astype(np.float32)
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.flags.c_contiguous
    assert ours.shape == reference.shape == (prepared.geometry.size[1], prepared.geometry.size[0], 3)
    # The reference keeps float values, overshoot past 0..255 included; bytes can only round and clip.
    difference = np.abs(ours - np.clip(reference, 0, 255))
    assert difference.max() <= 0.5 + 1e-3 and difference.mean() < 0.3
    # Rounded, we differ only on .5 ties where float sums in another order land on the other side.
    assert np.mean(ours != np.rint(np.clip(reference, 0, 255))) < 1e-4


def test_pillow_bicubic_would_not_match(mc_encoder: ImageEncoder) -> None:
    """Why resize_bicubic exists: Pillow's antialiased bicubic is far from OpenCV's when shrinking."""
    image = photo_like(1500, 1100, seed=1)
    reference = np.clip(mc_pixels(mc_encoder, image), 0, 255)
    pillow = np.asarray(image.resize((1024, 752), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(pillow - reference).mean() > 5 * np.abs(prepare_image(image).pixels - reference).mean()


def test_alpha_on_white_matches_mistral_common(mc_encoder: ImageEncoder) -> None:
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8))  # already 64x48: no resize
    assert np.array_equal(prepare_image(rgba).pixels, mc_pixels(mc_encoder, rgba).round().astype(np.uint8))


def test_no_resize_at_final_size() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    prepared = prepare_image(pixels)
    assert np.array_equal(prepared.pixels, pixels) and prepared.geometry.size == (48, 32)
    assert np.array_equal(resize_bicubic(pixels, (48, 32)), pixels)


def test_smaller_budget_shrinks_pixels() -> None:
    prepared = prepare_image(photo_like(1000, 600, seed=2), max_image_size=512)
    assert prepared.pixels.shape == (320, 512, 3) and prepared.geometry.n_image_positions == 20 * 33


# --- loading --------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def colours(image: Image.Image) -> set[tuple[int, ...]]:
    assert image.mode == "RGB"
    return {tuple(int(v) for v in c) for c in np.asarray(image).reshape(-1, 3)}


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert load_image(data).size == (20, 40)
    assert prepare_image(data).geometry.original == (20, 40)


def test_rgba_transparency_becomes_white() -> None:
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[:8] = (0, 0, 255, 255)  # opaque blue top half, transparent black bottom half
    image = load_image(Image.fromarray(pixels))
    assert np.asarray(image)[0, 0].tolist() == [0, 0, 255] and np.asarray(image)[15, 0].tolist() == [*WHITE]


def test_palette_png_with_transparency() -> None:
    palette_image = Image.new("P", (8, 8), 0)
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette_image.paste(1, (0, 0, 4, 8))
    image = load_image(encode(palette_image, "PNG", transparency=0))
    assert np.asarray(image)[0, 0].tolist() == [0, 200, 0] and np.asarray(image)[0, 7].tolist() == [*WHITE]


def test_cmyk_jpeg() -> None:
    image = load_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    red = np.asarray(image).astype(int)
    assert red[..., 0].min() > 240 and red[..., 1:].max() < 15


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    samples = np.array([[0, 257 * 100, 65535, 300]], np.uint16)
    data = encode(Image.fromarray(samples), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert np.asarray(load_image(data))[0, :, 0].tolist() == [0, 100, 255, 1]


@pytest.mark.parametrize("mode, value, expected", [("L", 77, (77, 77, 77)), ("1", 1, WHITE),
                                                     ("LA", (90, 255), (90, 90, 90)), ("LA", (90, 0), WHITE),
                                                     ("RGB", (1, 2, 3), (1, 2, 3))])
def test_modes_become_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    assert colours(load_image(encode(Image.new(mode, (4, 4), value), "PNG"))) == {expected}


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                  **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert colours(load_image(data)) == {(255, 0, 0)}


def test_paths_bytes_and_pil_sources(tmp_path: Path) -> None:
    source = Image.new("RGBA", (6, 4), (10, 20, 30, 255))
    data = encode(source, "PNG")
    (tmp_path / "a.png").write_bytes(data)
    sources = (tmp_path / "a.png", str(tmp_path / "a.png"), data, bytearray(data), memoryview(data), source)
    for item in sources:
        image = load_image(item)
        assert image.size == (6, 4) and colours(image) == {(10, 20, 30)}
    assert source.mode == "RGBA" and source.getpixel((0, 0)) == (10, 20, 30, 255)  # caller's image untouched


@pytest.mark.parametrize("array, expected", [
    (np.full((4, 6), 9, np.uint8), (9, 9, 9)),
    (np.full((4, 6, 1), 9, np.uint8), (9, 9, 9)),
    (np.full((4, 6, 2), (9, 0), np.uint8), WHITE),
    (np.full((4, 6, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
    (np.full((4, 6, 4), (1, 2, 3, 255), np.uint8), (1, 2, 3)),
    (np.full((4, 6, 4), (1, 2, 3, 0), np.uint8), WHITE),
    (np.full((4, 6, 3), (0, 257 * 7, 65535), np.uint16), (0, 7, 255)),
    (np.full((4, 6, 3), (-1.0, 0.5, 2.0), np.float32), (0, 128, 255)),
    (np.full((4, 6), True), WHITE),
    (np.full((6, 4, 3), (1, 2, 3), np.uint8).transpose(1, 0, 2), (1, 2, 3)),  # not C-contiguous
])
def test_numpy_arrays(array: np.ndarray, expected: tuple[int, int, int]) -> None:
    image = load_image(array)
    assert image.size == (6, 4) and colours(image) == {expected}


# --- failures -------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height (1-bit grey)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, message", [
    (100_000, 100_000, "decompression bomb"),  # beyond Pillow's own hard limit: refused in Image.open
    (10_000, 10_000, "10000x10000 = 100,000,000 pixels, over the limit of 50,000,000"),  # Pillow warns
    (8_000, 8_000, "8000x8000 = 64,000,000 pixels, over the limit"),
])
def test_decompression_bomb_refused_before_decoding(width: int, height: int, message: str) -> None:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks to the caller
        with pytest.raises(ImageError, match=message) as caught:
            prepare_image(png_claiming(width, height))
    assert str(caught.value).startswith("<bytes>:")
    assert time.perf_counter() - started < 1.0


def test_max_pixels_is_configurable() -> None:
    image = Image.new("RGB", (100, 100))
    with pytest.raises(ImageError, match="100x100 = 10,000 pixels, over the limit of 9,999"):
        load_image(image, max_pixels=9_999)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(np.zeros((100, 100, 3), np.uint8), max_pixels=9_999)
    assert load_image(image, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match="truncated"):  # no limit: decoding starts, and finds no data
        load_image(png_claiming(2_000, 2_000), max_pixels=None)
    with pytest.raises(ImageError, match="max_pixels must be a positive integer"):
        load_image(image, max_pixels=0)


def test_truncated_jpeg(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot decode image \(OSError: .*truncated"):
        load_image(path)


@pytest.mark.parametrize("content, message", [
    (np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
     r"not an image format pixtral-cpp decodes \(PNG, JPEG, WebP, GIF, BMP, TIFF"),
    (b"", "empty, not an image"),
    (b"A plain text file, not an image.\n", "not an image format pixtral-cpp decodes"),
    (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
     "PDF is not an accepted image format; pixtral-cpp decodes PNG, JPEG, WebP, GIF, BMP, TIFF"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt image: its header cannot be read"),
])
def test_not_an_image(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"file\.bin: " + message):
        load_image(path)
    with pytest.raises(ImageError, match=r"^<bytes>: " + message):
        load_image(content)


def test_missing_path_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        prepare_image(str(tmp_path))


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 10, 3), np.uint8), r"no pixels \(10x0\)"),
    (np.zeros(10, np.uint8), r"must be \(H, W\) or \(H, W, C\).*shape \(10,\)"),
    (np.zeros((2, 2, 2, 2), np.uint8), "got shape"),
    (np.zeros((4, 4, 5), np.uint8), r"shape \(4, 4, 5\)"),
    (np.zeros((4, 4, 3), np.int64), "unsupported image array dtype int64"),
    (np.zeros((4, 4), np.complex64), "unsupported image array dtype complex64"),
    (np.zeros((4, 4), object), "unsupported image array dtype object"),
    (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
])
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(42)  # type: ignore[arg-type]


def test_bad_budget_fails_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="max_image_size"):
        prepare_image(tmp_path / "missing.png", max_image_size=2048)


# --- reducing while decoding ----------------------------------------------------------------------


def test_reduce_while_decoding_keeps_geometry_and_shrinks_the_decode() -> None:
    exact_size, reduced_size = (4200, 3000), (2100, 1500)  # 1/2 keeps 2x the 1024x736 grid; 1/4 would not
    data = encode(Image.new("RGB", exact_size, (30, 140, 220)), "JPEG", quality=90)
    assert load_image(data).size == exact_size
    assert load_image(data, reduce_while_decoding=True).size == reduced_size
    assert prepare_image(data, reduce_while_decoding=True).geometry == prepare_image(data).geometry
    png = encode(Image.new("RGB", exact_size, (30, 140, 220)), "PNG")  # no DCT scaling: decoded whole
    assert load_image(png, reduce_while_decoding=True).size == exact_size


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_pixels_stay_close(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo_like(1200, 900, seed=4), "JPEG", quality=90, exif=exif.tobytes())
    exact = prepare_image(data, max_image_size=256)
    reduced = prepare_image(data, max_image_size=256, reduce_while_decoding=True)
    # geometry from the file's own (oriented) size, not from the 600x450 decode
    assert reduced.geometry == exact.geometry and exact.geometry.original == ((900, 1200) if orientation == 6
                                                                              else (1200, 900))
    difference = np.abs(reduced.pixels.astype(int) - exact.pixels.astype(int))
    # Measured: mean 6.9, max 59. The exact path point-samples the noise (no antialiasing, like
    # mistral-common); DCT scaling averages it first.
    assert difference.mean() < 8.5 and difference.max() < 90


# --- quiet decoding -------------------------------------------------------------------------------


def tiff_with_tag(tag: int, value: int) -> bytes:
    """A deflate TIFF (decoded by libtiff) whose last IFD entry is replaced by `tag` = `value`."""
    data = bytearray(encode(photo_like(24, 16, seed=0), "TIFF", compression="tiff_adobe_deflate",
                            tiffinfo={305: "pixtral"}))
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, ifd)[0]
    for index in range(entries):
        at = ifd + 2 + 12 * index
        if struct.unpack_from("<H", data, at)[0] in (305, tag):  # Software, last; or the tag to change
            kind = 4 if tag in (273, 279) else 3  # LONG offsets and counts, SHORT otherwise
            struct.pack_into("<HHII", data, at, tag, kind, 1, value)
            if tag in (273, 279):
                break
    return bytes(data)


def test_libtiff_warnings_do_not_leak(capfd: pytest.CaptureFixture[str]) -> None:
    data = tiff_with_tag(296, 9)  # ResolutionUnit 9: libtiff prints 'Bad value 9' and decodes anyway
    assert load_image(data).size == (24, 16)
    assert capfd.readouterr() == ("", "")


def test_libtiff_error_goes_into_the_image_error(capfd: pytest.CaptureFixture[str]) -> None:
    data = tiff_with_tag(279, 1_000_000)  # StripByteCounts past the end of the file
    with pytest.raises(ImageError, match=r"^<bytes>: cannot decode image \(OSError: .*; libtiff: TIFFFillStrip: "
                                         r"Read error on strip 0"):
        load_image(data)
    assert capfd.readouterr() == ("", "")


def test_python_warnings_do_not_leak() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.info["transparency"] = b"\x00\xff"  # bytes transparency: Pillow warns when converting
    sources = [palette, encode(palette, "PNG", transparency=b"\x00\xff"),
               jpeg_with_exif(b"Exif\0\0II*\0" + struct.pack("<I", 1_000_000))]  # 'Corrupt EXIF data'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for source in sources:
            assert load_image(source).size in ((8, 8), (40, 20))
    assert not any("PIL" in str(entry[3]) for entry in warnings.filters)  # our filter is gone again


def jpeg_with_exif(payload: bytes) -> bytes:
    """A 40x20 red JPEG with `payload` as its APP1 (EXIF) segment."""
    data = encode(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG")
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def exif_ifd(*entries: tuple[int, int, int, bytes]) -> bytes:
    body = b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries))
    return body + b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in entries) + b"\0\0\0\0"


@pytest.mark.parametrize("payload, size", [
    (exif_ifd((0x0112, 3, 1, struct.pack("<HH", 6, 0))), (20, 40)),  # sound: rotated
    (exif_ifd((0x0112, 3, 1, struct.pack("<HH", 99, 0))), (40, 20)),  # no such orientation
    (exif_ifd((0x0112, 2, 4, b"abc\0")), (40, 20)),  # a string
    (exif_ifd((0x0112, 5, 1, struct.pack("<I", 8))), (40, 20)),  # a rational
    (exif_ifd((0x0112, 3, 100_000, struct.pack("<I", 4000))), (40, 20)),  # data past the end
    (exif_ifd((0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x8769, 4, 1, struct.pack("<I", 10**6))), (20, 40)),
    (b"Exif\0\0" + b"\xff" * 30, (40, 20)),
])
def test_bad_exif_still_decodes(payload: bytes, size: tuple[int, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(jpeg_with_exif(payload)).size == size


def test_unreadable_exif_is_ignored(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file (header b'\\xff\\xff' not valid)")  # what Pillow raises on some EXIF
    monkeypatch.setattr(Image.Image, "getexif", broken)
    with caplog.at_level("DEBUG", logger="pixtral_cpp.image_decode"):
        assert load_image(jpeg_with_exif(exif_ifd((0x0112, 3, 1, struct.pack("<HH", 6, 0))))).size == (40, 20)
    assert "EXIF unreadable (SyntaxError" in caplog.text


def test_many_frames_are_never_walked() -> None:
    """A GIF of 100,000 frames: only the first is decoded, and nothing counts the others."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\xff\0\0\0\0\xff"  # red, blue
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00")  # 1 px of colour 0
    data = screen + frame * 100_000 + b";"
    started = time.perf_counter()
    assert colours(load_image(data)) == {(255, 0, 0)}
    assert prepare_image(data).geometry.n_image_positions == 2
    assert time.perf_counter() - started < 0.5


def test_capture_stderr_collects_what_c_code_writes(capfd: pytest.CaptureFixture[str]) -> None:
    with capture_stderr() as outer:
        os.write(2, b"outer ")
        with capture_stderr() as inner:  # nested in one thread: the lock is re-entrant
            os.write(2, b"libtiff: Bad value\n")
        assert inner == ["libtiff: Bad value\n"]
        os.write(2, b"again\n")
    assert outer == ["outer again\n"]
    with capture_stderr() as quiet:
        pass
    assert quiet == [] and capfd.readouterr() == ("", "")
    os.write(2, b"after\n")  # descriptor 2 is restored
    assert capfd.readouterr().err == "after\n"
