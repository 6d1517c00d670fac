"""pixtral-cpp's describe vs llama.cpp's own `llama-mtmd-cli`, same GGUF pair, image and threads.

    python benchmarks/bench_vs_mtmd_cli.py --mtmd-cli /path/to/llama-mtmd-cli --shape wide --runs 3

Build llama-mtmd-cli from the llama-cpp-python 0.3.36 sdist (same llama.cpp):
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-mtmd-cli
The image is pre-sized to 1024x768 (multiples of 16) so both see the same pixels and, with
`--image-max-tokens 4096`, the same 3072 patches. Figures are medians over --runs fresh processes.
On CPUs with AMX, llama-mtmd-cli runs with `--no-repack` (its AMX path segfaults, llama.cpp#20824),
as pixtral-cpp does.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from bench_describe import ensure_model
from measure import measure
from PIL import Image

from pixtral_cpp.backend._native import repacking_is_safe

PROMPT = "Describe this image."
# llama-mtmd-cli's single-prompt mode logs the image encode but no llama_perf summary: compare what
# both report (wall time of the whole process, encode time, peak RSS).
_ENCODE = re.compile(r"(?:slice encoded|batch encoding done) in (\d+) ms")


def mtmd_cli_run(cli: Path, text: Path, mmproj: Path, image: Path, threads: int, n_predict: int,
                 log: Path) -> dict[str, float]:
    cmd = [str(cli), "-m", str(text), "--mmproj", str(mmproj), "--image", str(image), "-p", PROMPT,
           "-n", str(n_predict), "-t", str(threads), "-c", "8192", "--temp", "0",
           "--image-min-tokens", "1", "--image-max-tokens", "4096", "-fa", "off"]
    if not repacking_is_safe():
        cmd.append("--no-repack")
    result = measure(cmd, log_path=str(log))
    if result.returncode:
        raise RuntimeError(f"llama-mtmd-cli failed ({result.returncode}); see {log}")
    encode_ms = sum(float(v) for v in _ENCODE.findall(log.read_text(errors="replace")))
    return {"wall_s": result.seconds, "encode_s": encode_ms / 1000, "peak_rss_gb": result.peak_rss_gb}


def ours_run(text: Path, mmproj: Path, image: Path, threads: int, n_predict: int, log: Path) -> dict[str, float]:
    exe = str(Path(sys.executable).with_name("pixtral-cpp"))
    cmd = [exe, "describe", str(image), "-p", PROMPT, "--model", str(text), "--mmproj", str(mmproj),
           "--max-tokens", str(n_predict), "--temperature", "0", "--ctx", "8192", "--threads", str(threads),
           "--json"]
    result = measure(cmd, log_path=str(log))
    if result.returncode:
        raise RuntimeError(f"pixtral-cpp failed ({result.returncode}); see {log}")
    stats = json.loads(log.read_text().strip().splitlines()[-1])["stats"]
    return {"wall_s": result.seconds, "encode_s": stats["image_encode_seconds"],
            "peak_rss_gb": result.peak_rss_gb, "prompt_tok_s": stats["prompt_tokens_per_second"],
            "gen_tok_s": stats["generated_tokens_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtmd-cli", type=Path, required=True)
    parser.add_argument("--shape", default="wide")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-predict", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pixtral-cpp-bench"))
    args = parser.parse_args()

    text = ensure_model(args.work_dir, args.shape, args.quant)
    mmproj = next(text.parent.glob("mmproj-*.gguf"))
    image = args.work_dir / "photo-1024x768.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(image)
    theirs = [mtmd_cli_run(args.mtmd_cli, text, mmproj, image, args.threads, args.n_predict,
                           args.work_dir / f"mtmd-cli-{i}.log") for i in range(args.runs)]
    mine = [ours_run(text, mmproj, image, args.threads, args.n_predict, args.work_dir / f"ours-{i}.log")
            for i in range(args.runs)]
    keys = ["wall_s", "encode_s", "peak_rss_gb"]
    print(f"{args.shape} {args.quant}, 1024x768 image, {args.threads} threads, median of {args.runs}")
    print(f"{'metric':<16} {'pixtral-cpp':>12} {'llama-mtmd-cli':>15} {'ratio':>7}")
    for key in keys:
        a, b = statistics.median(r[key] for r in mine), statistics.median(r[key] for r in theirs)
        print(f"{key:<16} {a:>12.3f} {b:>15.3f} {a / b if b else float('nan'):>7.3f}")
    for key in ("prompt_tok_s", "gen_tok_s"):
        print(f"{key:<16} {statistics.median(r[key] for r in mine):>12.3f} {'-':>15} {'-':>7}")


if __name__ == "__main__":
    main()
