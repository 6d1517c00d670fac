"""Only the raster formats Pixtral is meant for are decoded, chosen from the bytes; paths fail cleanly.

EPS is the case that matters: Pillow's EPS plugin hands the file to Ghostscript when the pixels are
loaded. These tests replace Ghostscript with a spy (it need not be installed) and show that our loader
never reaches it, while plain Pillow would.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, features

from pixtral_cpp.errors import ImageError
from pixtral_cpp.images import load_image, prepare_image

ACCEPTED = "pixtral-cpp decodes PNG, JPEG, WebP, GIF, BMP, TIFF"
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 24, height: int = 16) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 10, y * 15, x + y], -1).astype(np.uint8))


@pytest.fixture
def ghostscript_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every attempt to run Ghostscript or even to parse EPS, instead of running anything."""
    calls: list[str] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        calls.append("Ghostscript")
        raise OSError("Ghostscript spy: would have run gs on the caller's PostScript")

    original_open = EpsImagePlugin.EpsImageFile._open

    def eps_open(self: EpsImagePlugin.EpsImageFile) -> None:
        calls.append("EpsImageFile._open")
        original_open(self)

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_open)
    return calls


def test_plain_pillow_would_run_ghostscript(ghostscript_spy: list[str]) -> None:
    """Why the allow-list exists: Image.open accepts the PostScript and load() runs Ghostscript."""
    with Image.open(io.BytesIO(EPS)) as image:
        assert image.format == "EPS"
        with pytest.raises(OSError, match="Ghostscript spy"):
            image.load()
    assert ghostscript_spy == ["EpsImageFile._open", "Ghostscript"]


@pytest.mark.parametrize("suffix", [".eps", ".png", ".jpg"])
def test_eps_is_refused_without_reaching_the_plugin(tmp_path: Path, ghostscript_spy: list[str], suffix: str) -> None:
    path = tmp_path / f"photo{suffix}"
    path.write_bytes(EPS)
    for source, name in ((EPS, "<bytes>"), (path, str(path)), (memoryview(EPS), "<bytes>")):
        with pytest.raises(ImageError, match=f"^{name}: PostScript \\(EPS\\) is not an accepted image format; "
                                             f"{ACCEPTED}"):
            prepare_image(source)
    dos_eps = b"\xc5\xd0\xd3\xc6" + b"\0" * 28 + EPS
    with pytest.raises(ImageError, match=r"PostScript \(EPS\) is not an accepted"):
        load_image(dos_eps)
    assert ghostscript_spy == []


def test_lazy_pil_image_of_a_refused_format(ghostscript_spy: list[str]) -> None:
    lazy = Image.open(io.BytesIO(EPS))  # what an app may hand us: opened by Pillow, not decoded yet
    with pytest.raises(ImageError, match=r"<PIL image>: a EPS image not decoded yet; pixtral-cpp decodes only "
                                         r"PNG.*call image.load\(\) first if you trust the file"):
        load_image(lazy)
    assert ghostscript_spy == ["EpsImageFile._open"]  # the app's own open; nothing of ours ran the plugin
    ppm = Image.open(io.BytesIO(encode(gradient(), "PPM")))
    with pytest.raises(ImageError, match="a PPM image not decoded yet"):
        load_image(ppm)
    ppm.load()  # pixels in memory are just pixels: accepted once the app decoded them
    assert np.array_equal(np.asarray(load_image(ppm)), np.asarray(gradient()))


def refused_samples() -> list[tuple[str, bytes, str]]:
    """(id, bytes, message) for formats Pillow would open or that we at least recognise."""
    image = gradient(16, 16)
    samples = [
        ("pdf", encode(image, "PDF"), "PDF"),
        ("ico", encode(image, "ICO"), r"Windows icon \(ICO\)"),
        ("ppm", encode(image, "PPM"), r"Netpbm \(PBM/PGM/PPM\)"),
        ("pgm", b"P5\n2 2\n255\n\0\0\0\0", r"Netpbm \(PBM/PGM/PPM\)"),
        ("dds", encode(image, "DDS"), r"DirectDraw Surface \(DDS\)"),
        ("qoi", encode(image, "QOI"), "QOI"),
        ("psd", b"8BPS\0\1" + b"\0" * 64, r"Photoshop \(PSD\)"),
        ("svg", b'\xef\xbb\xbf  <?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        ("svg-bare", b"<svg width='1' height='1'/>", "SVG"),
        ("html", b"<!DOCTYPE html><html><body><img src=x></body></html>", "HTML"),
        ("heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 16, "HEIF/HEIC"),
        ("zip", b"PK\x03\x04" + b"\0" * 40, "ZIP archive"),
        ("jxl", b"\xff\x0a" + b"\0" * 30, "JPEG XL"),
        ("wmf", b"\xd7\xcd\xc6\x9a" + b"\0" * 40, r"Windows Metafile \(WMF\)"),
    ]
    if features.check("jpg_2000"):
        samples.append(("jp2", encode(image, "JPEG2000"), "JPEG 2000"))
    return samples


@pytest.mark.parametrize("data, what", [pytest.param(d, w, id=i) for i, d, w in refused_samples()])
def test_refused_formats_are_named(data: bytes, what: str) -> None:
    with pytest.raises(ImageError, match=f"^<bytes>: {what} is not an accepted image format; {ACCEPTED}"):
        load_image(data)


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "SGI", "MSP", "XBM", "SPIDER"])
def test_formats_pillow_reads_but_we_do_not(fmt: str) -> None:
    mode = "1" if fmt in ("XBM", "MSP") else "F" if fmt == "SPIDER" else "RGB"
    data = encode(gradient(16, 16).convert(mode), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow alone would decode it
    with pytest.raises(ImageError, match="^<bytes>: (not an image format pixtral-cpp decodes \\(PNG, JPEG, "
                                         "WebP, GIF, BMP, TIFF|.* is not an accepted image format)"):
        load_image(data)


def accepted_samples() -> list[tuple[str, bytes, int]]:
    """(format, bytes, tolerance in grey levels) for every family we decode, written by Pillow."""
    image = gradient()
    samples = [("PNG", encode(image, "PNG"), 0), ("BMP", encode(image, "BMP"), 0),
               ("TIFF", encode(image, "TIFF"), 0), ("BigTIFF", encode(image, "TIFF", big_tiff=True), 0),
               ("TIFF-deflate", encode(image, "TIFF", compression="tiff_adobe_deflate"), 0),
               ("GIF", encode(image, "GIF"), 40), ("WEBP", encode(image, "WEBP", lossless=True), 0),
               ("JPEG", encode(image, "JPEG", quality=95), 12),
               ("MPO", encode(image, "MPO", save_all=True, append_images=[Image.new("RGB", (24, 16))]), 12)]
    if features.check("avif"):
        samples.append(("AVIF", encode(image, "AVIF", quality=100), 16))
    return samples


@pytest.mark.parametrize("data, tolerance", [pytest.param(d, t, id=f) for f, d, t in accepted_samples()])
def test_accepted_formats_round_trip(tmp_path: Path, data: bytes, tolerance: int) -> None:
    path = tmp_path / "renamed.txt"  # the suffix plays no part
    path.write_bytes(data)
    for source in (data, path):
        pixels = np.asarray(load_image(source)).astype(int)
        assert pixels.shape == (16, 24, 3)
        assert np.abs(pixels - np.asarray(gradient())).max() <= tolerance


def test_mpo_gives_its_first_picture() -> None:
    first, second = Image.new("RGB", (24, 16), (250, 0, 0)), Image.new("RGB", (24, 16), (0, 0, 250))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    red = np.asarray(load_image(data)).astype(int)
    assert red[..., 0].min() > 240 and red[..., 2].max() < 15


def test_png_named_jpg_is_chosen_from_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "holiday.jpg"
    path.write_bytes(encode(gradient(), "PNG"))
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(gradient()))


# --- paths ----------------------------------------------------------------------------------------


def test_nul_byte_and_unencodable_paths(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"^'a\\x00b\.png': the path contains a NUL byte$"):
        load_image("a\0b.png")
    with pytest.raises(ImageError, match="the path contains a NUL byte"):
        prepare_image(tmp_path / "x\0y")
    with pytest.raises(ImageError, match=r"^'\\ud800\.png': the path cannot be encoded for the file system$"):
        load_image("\ud800.png")


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(ImageError, match=r"a\.png: too many levels of symbolic links \(a symlink loop\?\)"):
        load_image(tmp_path / "a.png")


def test_folder_and_devices(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match=r"^/dev/null: is a character device, not an image file$"):
        load_image("/dev/null")
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")  # an endless stream behind an innocent name
    with pytest.raises(ImageError, match="zero.png: is a character device"):
        load_image(link)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _catch(outcome, lambda: load_image(fifo)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock the open() so the thread can finish, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_image blocked on a named pipe")
    assert len(outcome) == 1 and isinstance(outcome[0], ImageError)
    assert str(outcome[0]).endswith("pipe.png: is a named pipe (FIFO), not an image file")


def _catch(outcome: list[BaseException], call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        outcome.append(exc)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(encode(gradient(), "PNG"))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the open fail as it would for a user
        real_open = os.open

        def denied(name: object, *args: object) -> int:
            if os.fspath(name) == str(path):  # type: ignore[arg-type]
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(name, *args)  # type: ignore[arg-type]
        monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ImageError, match=r"secret\.png: permission denied: the file is not readable$"):
        load_image(path)


@pytest.mark.parametrize("head", [b"%!PS-Adobe-3.0\n", b"just text\n", b"RIFF\x10\0\0\0WEBPVP8 \x04\0\0\0\0\0\0\0",
                                  b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\1\0\0\0\1\0\0\x08\x02\0\0\0\0\0\0\0"])
def test_huge_file_is_not_read_whole(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "huge.png"
    with path.open("wb") as out:
        out.write(head)
        out.truncate(4 << 30)  # 4 GiB, sparse: reading it whole would take seconds and the memory
    started = time.perf_counter()
    with pytest.raises(ImageError, match="huge.png: "):
        load_image(path)
    assert time.perf_counter() - started < 1.0
