"""Inference benchmark through the public API: load, image encode, prompt and generation speed, RSS.

    python benchmarks/bench_describe.py --shape tiny --shape wide --quant Q4_K_M --work-dir /tmp/bench

For each model shape and image budget (512 and 1024 px) one fresh process loads the converted
synthetic model, describes a photo-sized image, then asks a follow-up question about it. Peak RSS
is that process's own. Random weights: the text is noise, the timings are real.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_convert import ensure_checkpoint
from PIL import Image

from pixtral_cpp.convert import ConvertOptions, convert_checkpoint


def ensure_model(work: Path, shape: str, quant: str) -> Path:
    out = work / f"{shape}-{quant}"
    text = out / f"Pixtral-{shape}-{quant}.gguf"
    if not text.is_file():
        source = ensure_checkpoint(work, shape, "hf")  # the checkpoint bench_convert.py measures
        convert_checkpoint(ConvertOptions(source=source, output_dir=out, quant=quant, force=True))
    return text


_MMAP = {"auto": None, "on": True, "off": False}


def _time_to_first_chunk(stream: Any) -> tuple[float, str, Any]:
    """Seconds until the first text arrives, the whole answer, its statistics (the stream is drained)."""
    from pixtral_cpp.results import TextChunk

    started, first, parts = time.monotonic(), None, []
    for chunk in stream:
        if isinstance(chunk, TextChunk):
            first = first if first is not None else time.monotonic() - started
            parts.append(chunk.text)
        else:
            return (first if first is not None else time.monotonic() - started), "".join(parts), chunk
    raise AssertionError("a stream always ends with its statistics")


def run_one(model: Path, budget: int, threads: int, max_tokens: int, image_path: Path | None = None,
            **model_options: Any) -> dict[str, float]:
    """One measurement in this process (called in a fresh subprocess by the driver)."""
    from pixtral_cpp.model import PixtralModel
    from pixtral_cpp.options import ModelOptions

    image = (np.asarray(Image.open(image_path).convert("RGB")) if image_path else
             np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))  # a 1024x768 photo
    started = time.monotonic()
    options = ModelOptions(max_image_size=budget, threads=threads, **model_options)
    with PixtralModel.load(model, options=options) as pixtral:
        load = time.monotonic() - started
        first_token, answer, first = _time_to_first_chunk(
            pixtral.stream_describe(image, "Describe this image.", max_tokens=max_tokens, temperature=0))
        history = [{"role": "user", "content": [{"type": "image", "image": image},
                                                {"type": "text", "text": "Describe this image."}]},
                   {"role": "assistant", "content": answer},
                   {"role": "user", "content": "What colours dominate?"}]
        follow_first_token, _, follow = _time_to_first_chunk(
            pixtral.stream_chat(history, max_tokens=2, temperature=0))
    s = first
    return {
        "load_s": load, "image_tokens": s.image_tokens, "encode_s": s.image_encode_seconds,
        "prompt_s": s.prompt_seconds, "prompt_tok_s": s.prompt_tokens_per_second,
        "gen_tok_s": s.generated_tokens_per_second,
        "first_token_s": first_token,
        "follow_up_first_token_s": follow_first_token, "follow_up_encodes": follow.images_encoded,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="tiny, wide (real width) or full; repeatable")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--budget", type=int, action="append", help="image budgets in px (default 512, 1024)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pixtral-cpp-bench"))
    parser.add_argument("--runs", type=int, default=1, help="fresh processes per row; medians are printed")
    parser.add_argument("--repack", action="store_true", help="llama.cpp's repacked weights (default: off)")
    parser.add_argument("--mmap", choices=["auto", "on", "off"], default="auto",
                        help="map the model file (auto: unless repacking) or read it into memory")
    parser.add_argument("--run-one", nargs=2, metavar=("MODEL", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    flags = ["--threads", str(args.threads), "--max-tokens", str(args.max_tokens)]
    flags += ["--repack"] * args.repack + ["--mmap", args.mmap]
    if args.run_one:
        print(json.dumps(run_one(Path(args.run_one[0]), int(args.run_one[1]), args.threads, args.max_tokens,
                                 repack_weights=args.repack, use_mmap=_MMAP[args.mmap])))
        return
    columns = ["load_s", "image_tokens", "encode_s", "prompt_s", "prompt_tok_s", "gen_tok_s", "first_token_s",
               "follow_up_first_token_s", "peak_rss_gb"]
    print(f"{'shape':<6} {'budget':>6} " + " ".join(f"{c:>12}" for c in columns) + "  follow-up/first")
    for shape in args.shape or ["tiny"]:
        model = ensure_model(args.work_dir, shape, args.quant)
        for budget in args.budget or [512, 1024]:
            runs = [json.loads(subprocess.run([sys.executable, __file__, "--run-one", str(model), str(budget), *flags],
                                              capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                    for _ in range(args.runs)]
            r = {c: statistics.median(run[c] for run in runs) for c in columns}
            ratio = r["follow_up_first_token_s"] / r["first_token_s"]
            print(f"{shape:<6} {budget:>6} " + " ".join(f"{r[c]:>12.3f}" for c in columns) + f"  {ratio:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
