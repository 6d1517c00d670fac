"""A real `pixtral-cpp serve` process on a free loopback port, for tests that drive it with real clients."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

STARTUP_SECONDS = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(text: Path, mmproj: Path, log_path: Path, *args: str, key: str | None = None,
            env: dict[str, str] | None = None) -> Iterator[str]:
    """Base URL of `python -m pixtral_cpp.cli.serve` on the pair with `args`, stopped (SIGINT) afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "pixtral_cpp.cli.serve", "-m", str(text), "--mmproj", str(mmproj),
               "--port", str(port), "--threads", "2", "--no-cache", *args]
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    environment.pop("PIXTRAL_CPP_API_KEY", None)
    if key is not None:
        environment["PIXTRAL_CPP_API_KEY"] = key
    with log_path.open("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_until_healthy(base, process, log)
            yield base
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_healthy(base: str, process: subprocess.Popen[bytes], log: Sequence[str] | io.TextIOBase) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok":  # no key: /health is open
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server did not answer /health within {STARTUP_SECONDS} s")


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()
