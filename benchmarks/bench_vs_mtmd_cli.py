"""pixtral-cpp's describe vs llama.cpp's own `llama-mtmd-cli`, same GGUF pair, image, threads and libraries.

    python benchmarks/bench_vs_mtmd_cli.py --mtmd-cli BUILD/bin/llama-mtmd-cli --shape full --size 512x512 --runs 3

Build llama-mtmd-cli from the llama-cpp-python 0.3.36 sdist (same llama.cpp) as shared libraries:
    cmake -B BUILD -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF [CPU flags] && cmake --build BUILD --target llama-mtmd-cli
pixtral-cpp then runs on that same build's libllama/libmtmd (LLAMA_CPP_LIB_PATH, MTMD_CPP_LIB), so the
comparison is of the two programs, not of two compilations. The image is pre-sized (multiples of 16)
so both see the same pixels and patches. Figures are medians over --runs fresh
processes, alternating the two. Each tool reports its own phases: llama-mtmd-cli its log timestamps,
encode lines and `llama_perf_context_print`, pixtral-cpp its `--json` statistics. Weight repacking is
set the same way for both (--repack / --no-repack, default off).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from bench_describe import ensure_model
from measure import measure
from PIL import Image

PROMPT = "Describe this image."
_READY = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.\d+ I main: loading model", re.M)  # after text + mmproj load
_ENCODE = re.compile(r"(?:slice encoded|batch encoding done) in (\d+) ms")
_PROMPT = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs")

METRICS = ("load_s", "encode_s", "first_token_s", "prompt_tok_s", "gen_tok_s", "wall_s", "peak_rss_gb")


def shared_library_env(cli: Path) -> dict[str, str]:
    """Make llama-cpp-python load the libraries llama-mtmd-cli was linked against."""
    libs = str(cli.resolve().parent)
    return {"LLAMA_CPP_LIB_PATH": libs, "MTMD_CPP_LIB": libs}


def mtmd_cli_run(cli: Path, text: Path, mmproj: Path, image: Path, args: argparse.Namespace, log: Path
                 ) -> dict[str, float]:
    cmd = [str(cli), "-m", str(text), "--mmproj", str(mmproj), "--image", str(image), "-p", PROMPT,
           "-n", str(args.n_predict), "-t", str(args.threads), "-c", str(args.ctx), "--temp", "0", "--ignore-eos",
           "--image-min-tokens", "1", "--image-max-tokens", "4096", "-fa", "off", "--perf",
           "--log-timestamps", "--log-prefix", "-lv", "4"] + ([] if args.repack else ["--no-repack"])
    result = measure(cmd, log_path=str(log))
    if result.returncode:
        raise RuntimeError(f"llama-mtmd-cli failed ({result.returncode}); see {log}")
    return {**parse_mtmd_cli_log(log.read_text(errors="replace"), log), "wall_s": result.seconds,
            "peak_rss_gb": result.peak_rss_gb}


def parse_mtmd_cli_log(text_log: str, log: Path) -> dict[str, float]:
    """llama-mtmd-cli's phases from its log. llama.cpp's "prompt eval time" runs from the first prompt
    decode to the last one: `<s>[INST]` is decoded before the image is encoded, and only synchronized at
    the image's decode, so the encode is inside it. It therefore is the time to the first token."""
    ready, prompt, gen = _READY.search(text_log), _PROMPT.search(text_log), _EVAL.search(text_log)
    if not (ready and prompt and gen):
        raise RuntimeError(f"llama-mtmd-cli's log lacks the lines this benchmark reads; see {log}")
    encode_s = sum(float(v) for v in _ENCODE.findall(text_log)) / 1000
    prompt_s, gen_s = float(prompt[1]) / 1000, float(gen[1]) / 1000
    return {"load_s": int(ready[1]) * 60 + int(ready[2]) + int(ready[3]) / 1000, "encode_s": encode_s,
            "first_token_s": prompt_s, "prompt_tok_s": int(prompt[2]) / (prompt_s - encode_s),
            "gen_tok_s": int(gen[2]) / gen_s}


def ours_run(text: Path, mmproj: Path, image: Path, args: argparse.Namespace, log: Path) -> dict[str, float]:
    exe = str(Path(sys.executable).with_name("pixtral-cpp"))
    cmd = [exe, "describe", str(image), "-p", PROMPT, "--model", str(text), "--mmproj", str(mmproj),
           "--max-tokens", str(args.n_predict), "--temperature", "0", "--ctx", str(args.ctx),
           "--threads", str(args.threads), "--json", "--repack" if args.repack else "--no-repack"]
    result = measure(cmd, env=shared_library_env(args.mtmd_cli), log_path=str(log))
    if result.returncode:
        raise RuntimeError(f"pixtral-cpp failed ({result.returncode}); see {log}")
    data = json.loads(log.read_text().strip().splitlines()[-1])
    stats = data["stats"]
    return {"load_s": data["load_seconds"], "encode_s": stats["image_encode_seconds"],
            "first_token_s": stats["image_encode_seconds"] + stats["prompt_seconds"],
            "prompt_tok_s": stats["prompt_tokens_per_second"], "gen_tok_s": stats["generated_tokens_per_second"],
            "wall_s": result.seconds, "peak_rss_gb": result.peak_rss_gb, "image_tokens": stats["image_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtmd-cli", type=Path, required=True)
    parser.add_argument("--shape", default="wide")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--size", default="1024x768", help="image WIDTHxHEIGHT in px, multiples of 16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--n-predict", type=int, default=16)
    parser.add_argument("--repack", action="store_true", help="llama.cpp's repacked weights for both")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pixtral-cpp-bench"))
    args = parser.parse_args()

    text = ensure_model(args.work_dir, args.shape, args.quant)
    mmproj = next(text.parent.glob("mmproj-*.gguf"))
    width, height = (int(v) for v in args.size.split("x"))
    image = args.work_dir / f"photo-{width}x{height}.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
    theirs, mine = [], []
    for i in range(args.runs):  # alternating, so drift on a shared machine hits both alike
        tag = f"{args.shape}-{width}x{height}-{i}"
        theirs.append(mtmd_cli_run(args.mtmd_cli, text, mmproj, image, args, args.work_dir / f"mtmd-cli-{tag}.log"))
        mine.append(ours_run(text, mmproj, image, args, args.work_dir / f"ours-{tag}.log"))
    print(f"{args.shape} {args.quant}, {width}x{height} image ({mine[0]['image_tokens']} image positions), "
          f"{args.threads} threads, repack {'on' if args.repack else 'off'}, "
          f"libraries {os.path.basename(str(args.mtmd_cli.resolve().parent.parent))}, median of {args.runs}")
    print(f"{'metric':<16} {'pixtral-cpp':>12} {'llama-mtmd-cli':>15} {'ratio':>7}")
    for key in METRICS:
        a, b = statistics.median(r[key] for r in mine), statistics.median(r[key] for r in theirs)
        print(f"{key:<16} {a:>12.3f} {b:>15.3f} {a / b if b else float('nan'):>7.3f}")


if __name__ == "__main__":
    main()
