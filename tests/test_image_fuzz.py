"""Seeded fuzzing of image decoding: mutated files, random bytes and odd objects give ImageError or an image.

The loop runs in a child process so that a crash signal in a C decoder fails the test instead of killing
pytest; anything written to stderr (a leaked warning, libtiff or libjpeg chatter) fails it too. Run this
file directly (`python tests/test_image_fuzz.py --seed 7 --seconds 60`) for a longer session.
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

SEED = 20240911
SECONDS = 7.0
MAX_CASES = 15_000


def test_image_decoding_fuzz() -> None:
    run = subprocess.run([sys.executable, __file__, "--seed", str(SEED), "--seconds", str(SECONDS)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"fuzz child exited with {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.stderr == "", f"decoding wrote to stderr:\n{run.stderr[-3000:]}"
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith("image fuzz: seed") and " 0 failures" in summary, run.stdout[-3000:]
    cases = int(summary.split(" cases")[0].rsplit(" ", 1)[1])
    assert cases >= 200, summary  # enough work happened to mean something


# --- the child ------------------------------------------------------------------------------------


def valid_files() -> dict[str, bytes]:
    """Small, valid files of every accepted format, with features the decoders treat specially."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {}
    for name, image, fmt, params in [
        ("png", rgb, "PNG", {}), ("png-rgba", rgba, "PNG", {}), ("png-16", rgb.convert("I;16"), "PNG", {}),
        ("png-palette", rgb.convert("P"), "PNG", {"transparency": 3}),
        ("jpeg", rgb, "JPEG", {"exif": exif.tobytes()}), ("jpeg-progressive", rgb, "JPEG", {"progressive": True}),
        ("jpeg-cmyk", rgb.convert("CMYK"), "JPEG", {}), ("gif", rgb.convert("P"), "GIF", {}),
        ("webp", rgb, "WEBP", {"lossless": True}), ("webp-lossy", rgba, "WEBP", {"quality": 50}),
        ("bmp", rgb, "BMP", {}), ("bmp-rle", rgb.convert("P"), "BMP", {}),
        ("tiff", rgb, "TIFF", {}), ("tiff-deflate", rgba, "TIFF", {"compression": "tiff_adobe_deflate"}),
        ("tiff-lzw", rgb.convert("L"), "TIFF", {"compression": "tiff_lzw"}),
        ("tiff-jpeg", rgb, "TIFF", {"compression": "jpeg"}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        files[name] = buffer.getvalue()
    frames = [rgb.convert("P"), rgb.rotate(90, expand=False).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10)
    files["gif-animated"] = buffer.getvalue()
    return files


def with_png_size(data: bytes, width: int, height: int) -> bytes:
    """The PNG with IHDR's size replaced and its CRC fixed, so the decoder gets past the checksum."""
    header = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + data[8:12] + header + struct.pack(">I", zlib.crc32(header)) + data[33:]


def with_size_fields(name: str, data: bytes, width: int, height: int) -> bytes:
    """Overwrite where each format keeps its width and height (huge, zero or negative values)."""
    try:
        return _with_size_fields(name, data, width, height)
    except struct.error:  # an earlier mutation moved the fields
        return data


def _with_size_fields(name: str, data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    if name.startswith("png"):
        return with_png_size(data, width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    if name.startswith("jpeg"):
        at = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))  # baseline or progressive frame header
        if at > 0:
            struct.pack_into(">HH", out, at + 5, height & 0xFFFF, width & 0xFFFF)
    elif name.startswith("gif"):
        struct.pack_into("<HH", out, 6, width & 0xFFFF, height & 0xFFFF)
    elif name.startswith("bmp"):
        struct.pack_into("<ii", out, 18, max(min(width, 2**31 - 1), -2**31), max(min(height, 2**31 - 1), -2**31))
    elif name.startswith("tiff"):
        ifd = struct.unpack_from("<I", data, 4)[0]
        for index in range(struct.unpack_from("<H", data, ifd)[0]):
            at = ifd + 2 + 12 * index
            tag = struct.unpack_from("<H", data, at)[0]
            if tag in (256, 257):
                struct.pack_into("<HI", out, at + 2, 4, (width if tag == 256 else height) & 0xFFFFFFFF)
    elif name.startswith("webp") and len(out) > 30:
        struct.pack_into("<HH", out, 26, width & 0x3FFF, height & 0x3FFF)  # VP8 frame size (lossy)
    return bytes(out)


def mutate(rng: random.Random, name: str, data: bytes) -> bytes:
    """One random mutation, weighted towards the header where the interesting decisions happen."""
    kind = rng.randrange(7)
    out = bytearray(data)
    head = min(len(out), 64)
    if kind == 0:  # bit flips, mostly in the header
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(head) if rng.random() < 0.6 else rng.randrange(len(out))
            out[at] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        del out[rng.randrange(len(out)):]
    elif kind == 2:  # insertion
        at = rng.randrange(len(out) + 1)
        out[at:at] = rng.randbytes(rng.randint(1, 32))
    elif kind == 3:  # deletion of a range
        at = rng.randrange(len(out))
        del out[at:at + rng.randint(1, 32)]
    elif kind == 4:  # header fields set to extreme sizes
        sizes = [0, 1, -1, 65535, 2**16, 2**31 - 1, 2**32 - 1, 100_000, rng.randrange(1, 5000)]
        return with_size_fields(name, data, rng.choice(sizes), rng.choice(sizes))
    elif kind == 5:  # a block repeated (chunks, segments, IFD entries seen twice)
        at = rng.randrange(len(out))
        out[at:at] = out[at:at + rng.randint(1, 64)] * rng.randint(2, 20)
    else:  # random bytes over a stretch
        at = rng.randrange(len(out))
        length = rng.randint(1, 64)
        out[at:at + length] = rng.randbytes(min(length, len(out) - at))
    return bytes(out)


def odd_objects() -> Iterator[object]:
    """Sources that are not encoded files: wrong types, odd arrays, PIL images in unusual modes."""
    yield from (None, 3.5, 7, [], {}, object(), b"", bytearray(), memoryview(b""), "", "\0", "/", "/dev/null")
    yield from (np.zeros((0, 0, 3), np.uint8), np.zeros((3, 3, 7), np.uint8), np.zeros((2, 2), np.int8),
                np.full((2, 2), np.inf), np.zeros((1, 1, 1, 1), np.uint8), np.array("text"),
                memoryview(np.arange(12, dtype=np.float32)), np.zeros((1, 40000), np.uint8))
    for mode in ("1", "L", "LA", "P", "PA", "I", "I;16", "I;16B", "F", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr",
                 "LAB", "HSV", "La", "RGBa"):
        yield Image.new(mode, (5, 3))
    empty = Image.new("RGB", (1, 1))
    empty._size = (0, 0)  # an image object claiming no pixels
    yield empty


def cases(seed: int) -> Iterator[tuple[str, object]]:
    rng = random.Random(seed)
    files = valid_files()
    for name, data in files.items():
        yield f"{name}:valid", data
    for index, item in enumerate(odd_objects()):
        yield f"object-{index}:{type(item).__name__}", item
    names = sorted(files)
    while True:
        if rng.random() < 0.08:
            yield "random-bytes", rng.randbytes(rng.randint(0, 300))
            continue
        name = rng.choice(names)
        data = files[name]
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            data = mutate(rng, name, data) or data[:1]
        yield f"{name}:mutated", data


def fuzz(seed: int, seconds: float, max_cases: int, decode: Callable[..., object]) -> int:
    from pixtral_cpp.errors import ImageError

    started = time.perf_counter()
    count = refused = failures = 0
    for count, (label, source) in enumerate(cases(seed), start=1):
        try:
            decode(source, max_image_size=64, max_pixels=4_000_000, reduce_while_decoding=count % 2 == 0)
        except ImageError as exc:
            refused += 1
            assert "\n" not in str(exc), f"multi-line message: {exc!r}"
        except Exception:  # noqa: BLE001 - the failure this fuzzer exists to find
            failures += 1
            print(f"FAILURE case {count} ({label}): {traceback.format_exc(limit=3)}", flush=True)
            if isinstance(source, bytes):
                print(f"  bytes: {source[:200]!r}", flush=True)
        if count >= max_cases or time.perf_counter() - started > seconds:
            break
    elapsed = time.perf_counter() - started
    print(f"image fuzz: seed {seed}, {count} cases, {refused} refused, {count - refused - failures} decoded, "
          f"{failures} failures in {elapsed:.1f} s", flush=True)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--max-cases", type=int, default=MAX_CASES)
    args = parser.parse_args()
    from pixtral_cpp.images import prepare_image

    sys.exit(1 if fuzz(args.seed, args.seconds, args.max_cases, prepare_image) else 0)


if __name__ == "__main__":
    main()
