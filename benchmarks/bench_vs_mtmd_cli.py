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
import subprocess
import sys
from pathlib import Path

import numpy as np
from bench_describe import ensure_model
from measure import measure
from PIL import Image

from pixtral_cpp.backend._native import repacking_is_safe

PROMPT = "Describe this image."
_PATTERNS = {
    "load_s": r"load time =\s+([\d.]+) ms",
    "encode_s": r"slice encoded in (\d+) ms",
    "prompt_eval": r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens",
    "eval": r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs",
}


def mtmd_cli_run(cli: Path, text: Path, mmproj: Path, image: Path, threads: int, n_predict: int,
                 log: Path) -> dict[str, float]:
    cmd = [str(cli), "-m", str(text), "--mmproj", str(mmproj), "--image", str(image), "-p", PROMPT,
           "-n", str(n_predict), "-t", str(threads), "-c", "8192", "--temp", "0",
           "--image-min-tokens", "1", "--image-max-tokens", "4096", "-fa", "off"]
    if not repacking_is_safe():
        cmd.append("--no-repack")
    result = measure(cmd, log_path=str(log))
    out = log.read_text(errors="replace")
    if result.returncode:
        raise RuntimeError(f"llama-mtmd-cli failed ({result.returncode}); see {log}")
    prompt_ms, prompt_tokens = (float(v) for v in re.search(_PATTERNS["prompt_eval"], out).groups())
    eval_ms, runs = (float(v) for v in re.search(_PATTERNS["eval"], out).groups())
    encode_s = sum(float(v) for v in re.findall(_PATTERNS["encode_s"], out)) / 1000
    return {
        "load_s": float(re.search(_PATTERNS["load_s"], out).group(1)) / 1000,
        "encode_s": encode_s,
        "prompt_tok_s": prompt_tokens / (prompt_ms / 1000),
        "gen_tok_s": runs / (eval_ms / 1000) if eval_ms else 0.0,
        "first_token_s": encode_s + prompt_ms / 1000,
        "wall_s": result.seconds,
        "peak_rss_gb": result.peak_rss_gb,
    }


def ours_run(text: Path, image: Path, threads: int, n_predict: int) -> dict[str, float]:
    here = Path(__file__).parent
    script = (f"import sys, json; sys.path.insert(0, {str(here)!r}); from bench_describe import run_one; "
              f"from pathlib import Path; print(json.dumps(run_one(Path({str(text)!r}), 1024, {threads}, "
              f"{n_predict}, image_path=Path({str(image)!r}))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    mine = [ours_run(text, image, args.threads, args.n_predict) for _ in range(args.runs)]
    keys = ["load_s", "encode_s", "prompt_tok_s", "gen_tok_s", "first_token_s", "peak_rss_gb"]
    print(f"{args.shape} {args.quant}, 1024x768 image, {args.threads} threads, median of {args.runs}")
    print(f"{'metric':<16} {'pixtral-cpp':>12} {'llama-mtmd-cli':>15} {'ratio':>7}")
    for key in keys:
        a, b = statistics.median(r[key] for r in mine), statistics.median(r[key] for r in theirs)
        print(f"{key:<16} {a:>12.3f} {b:>15.3f} {a / b if b else float('nan'):>7.3f}")


if __name__ == "__main__":
    main()
