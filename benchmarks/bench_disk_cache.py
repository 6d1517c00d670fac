"""The prompt cache on disk across processes: a second process asking another question about the same photo.

    python benchmarks/bench_disk_cache.py --shape full --quant Q4_K_M --budget 512 --budget 1024 --work-dir /tmp/bench

For each image budget, in one run and with an empty cache folder each time, three fresh processes describe a
1024x768 photo: the first with the cache off (the baseline), the first with the cache on (it stores the
prefix through the image), then a second with the cache on and another question (it restores that prefix).
Each reports its model load separately from its time to first token, and how long closing the model took
(waiting for the background write). With --server, a server started afterwards (as after a restart)
is asked a third question about the photo. Storing's cost is measured twice: the first process's time to first token
against the baseline's (noisy on a shared machine), and the parts that run before the first token (the
snapshot copy; the writer thread runs beside the prompt's remaining evaluation and the generation).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_describe import _time_to_first_chunk, ensure_model

FIRST, SECOND = "Describe this image.", "What colours dominate in this picture?"


class _Timings(logging.Handler):
    """Collects the prompt cache's debug records: (message template, args)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def seconds(self, starts: str) -> float:
        return sum(r.args[-1] for r in self.records if r.msg.startswith(starts))  # type: ignore[index]


def run_one(model: Path, budget: int, question: str, cache: Path | None, threads: int, max_tokens: int,
            use_mmap: bool | None = None) -> dict[str, Any]:
    """One process's measurement (called in a fresh subprocess by the driver)."""
    from pixtral_cpp.disk_cache import entries
    from pixtral_cpp.model import PixtralModel
    from pixtral_cpp.options import ModelOptions

    timings = _Timings()
    logging.getLogger("pixtral_cpp").addHandler(timings)
    logging.getLogger("pixtral_cpp").setLevel(logging.DEBUG)
    image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)  # a 1024x768 photo
    options = ModelOptions(max_image_size=budget, threads=threads, disk_cache=cache is not None,
                           disk_cache_dir=cache, use_mmap=use_mmap)
    started = time.monotonic()
    pixtral = PixtralModel.load(model, options=options)
    load = time.monotonic() - started
    first_token, _, stats = _time_to_first_chunk(
        pixtral.stream_describe(image, question, max_tokens=max_tokens, temperature=0))
    started = time.monotonic()
    pixtral.close()  # waits for the entry to be written
    return {"load_s": load, "first_token_s": first_token, "close_s": time.monotonic() - started,
            "image_tokens": stats.image_tokens, "images_encoded": stats.images_encoded,
            "encode_s": stats.image_encode_seconds, "prompt_s": stats.prompt_seconds,
            "restored": stats.restored_tokens, "restore_s": stats.restore_seconds,
            "snapshot_s": timings.seconds("prompt cache: snapshot"), "write_s": timings.seconds("prompt cache: wrote"),
            "cache_bytes": sum(e.size for e in entries(cache)) if cache else 0}


def serve_once(model: Path, budget: int, question: str, cache: Path, threads: int, mmap: str) -> dict[str, Any]:
    """A freshly started server (as after a restart) asked about the photo: load until /health, first token."""
    import base64
    import io
    import os
    import socket

    import httpx
    from PIL import Image

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "pixtral_cpp.cli.serve", "-m", str(model), "--port", str(port),
                               "--threads", str(threads), "--max-image-size", str(budget)]
                              + {"auto": [], "on": ["--mmap"], "off": ["--no-mmap"]}[mmap],
                              env={**os.environ, "PIXTRAL_CPP_CACHE_DIR": str(cache)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        while not _healthy(httpx, base):
            if server.poll() is not None:
                raise RuntimeError("the server exited while loading")
            time.sleep(0.2)
        load = time.monotonic() - started
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": question}]}],
                "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        started, first, usage = time.monotonic(), None, {}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    first = time.monotonic() - started
                usage = event.get("usage") or usage
        return {"load_s": load, "first_token_s": first, "usage": usage}
    finally:
        server.terminate()
        server.wait(timeout=120)


def _healthy(httpx: Any, base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _child(model: Path, budget: int, question: str, cache: Path | None, flags: list[str]) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--run-one", str(model), str(budget), question, str(cache or "off"), *flags]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def measure(model: Path, budget: int, work: Path, flags: list[str], server: bool) -> dict[str, dict[str, Any]]:
    cache = work / f"prompt-cache-{budget}"
    shutil.rmtree(cache, ignore_errors=True)
    found = {"cold": _child(model, budget, FIRST, None, flags), "first": _child(model, budget, FIRST, cache, flags),
             "second": _child(model, budget, SECOND, cache, flags)}
    if server:  # a server started after them: restores what the describe processes stored
        found["server"] = serve_once(model, budget, "Is there any text in this image?", cache, int(flags[1]),
                                     flags[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="full", help="tiny, wide (real width) or full (the 12B shape)")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--budget", type=int, action="append", help="image budgets in px (default 512, 1024)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="rounds per budget; medians are printed")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pixtral-cpp-bench"))
    parser.add_argument("--server", action="store_true", help="also a server started afterwards (a restart)")
    parser.add_argument("--mmap", choices=["auto", "on", "off"], default="auto",
                        help="off: the weights are read at load, so the first decode does not fault them in")
    parser.add_argument("--run-one", nargs=4, metavar=("MODEL", "BUDGET", "QUESTION", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    flags = ["--threads", str(args.threads), "--max-tokens", str(args.max_tokens), "--mmap", args.mmap]
    if args.run_one:
        model, budget, question, cache = args.run_one
        print(json.dumps(run_one(Path(model), int(budget), question, None if cache == "off" else Path(cache),
                                 args.threads, args.max_tokens, {"auto": None, "on": True, "off": False}[args.mmap])))
        return
    model = ensure_model(args.work_dir, args.shape, args.quant)
    for budget in args.budget or [512, 1024]:
        rounds = [measure(model, budget, args.work_dir, flags, args.server) for _ in range(args.runs)]
        for round_ in rounds:
            print(json.dumps({"budget": budget, **round_}), flush=True)
        med = {kind: {key: statistics.median(r[kind][key] for r in rounds) for key in rounds[0][kind]}
               for kind in ("cold", "first", "second")}
        cold, first, second = med["cold"], med["first"], med["second"]
        print(f"{args.shape} {args.quant} {budget} px: image positions {first['image_tokens']}, entry "
              f"{first['cache_bytes'] / 1e6:.1f} MB; first token: cold {cold['first_token_s']:.2f} s, first with "
              f"cache {first['first_token_s']:.2f} s ({first['first_token_s'] / cold['first_token_s'] - 1:+.1%}; "
              f"snapshot {first['snapshot_s']:.3f} s, write {first['write_s']:.2f} s in the background, close "
              f"{first['close_s']:.2f} s), second {second['first_token_s']:.2f} s (restore "
              f"{second['restore_s']:.3f} s of {second['restored']} positions, images encoded "
              f"{second['images_encoded']}) = {second['first_token_s'] / first['first_token_s']:.3f}x; loads "
              f"{cold['load_s']:.1f} / {first['load_s']:.1f} / {second['load_s']:.1f} s", flush=True)
        if args.server:
            restarted = statistics.median(r["server"]["first_token_s"] for r in rounds)
            print(f"  server started afterwards: first token {restarted:.2f} s = "
                  f"{restarted / first['first_token_s']:.3f}x of the first process", flush=True)


if __name__ == "__main__":
    main()
