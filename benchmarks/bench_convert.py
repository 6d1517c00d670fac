"""Conversion benchmark: pixtral-cpp vs llama.cpp's own route, same checkpoint, same run.

    python benchmarks/bench_convert.py --shape wide --runs 3 --work-dir /tmp/bench \
        --llama-cpp-dir /path/to/llama_cpp_python-0.3.36/vendor/llama.cpp

Both routes read the same transformers-layout checkpoint. For each output type: wall time and peak
RSS of `pixtral-cpp convert` (one process), and of llama.cpp's route (convert_hf_to_gguf.py --outtype
bf16, then llama_model_quantize, the function llama-quantize runs, for quantized types), each step in
its own process; medians over --runs, alternating the routes. The llama.cpp route covers the text
model only: its mmproj route does not produce a loadable Pixtral projector in this version
(docs/gguf-layout.md §6); pixtral-cpp's time includes its mmproj.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from measure import Measurement, measure

from pixtral_cpp.synthetic import write_synthetic_checkpoint

# llama.cpp's own quantizer, the one tests/test_quant_mix.py compares with, run from the repository root.
ROOT = Path(__file__).resolve().parent.parent
_QUANTIZE_SNIPPET = (
    f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.llama_reference import LLAMA_FTYPES, quantize_gguf; "
    "quantize_gguf(sys.argv[1], sys.argv[2], LLAMA_FTYPES[sys.argv[3]], threads=int(sys.argv[4]))"
)


def ensure_checkpoint(work: Path, shape: str, layout: str) -> Path:
    folder = work / f"{shape}-{layout}" / f"Pixtral-{shape}"
    if not folder.is_dir():  # generated under another name first: an interrupted run leaves no half checkpoint
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        # llama.cpp's HF route reads tekken.json when there is no tokenizer.json
        write_synthetic_checkpoint(partial, layout=layout, shape=shape, seed=0,
                                   **({"hf_tokenizer_files": ("tekken.json",)} if layout == "hf" else {}))
        partial.rename(folder)
    return folder


def ours(source: Path, out: Path, quant: str, threads: int) -> Measurement:
    shutil.rmtree(out, ignore_errors=True)
    exe = str(Path(sys.executable).with_name("pixtral-cpp"))
    return measure([exe, "convert", str(source), "-o", str(out), "--quant", quant, "--threads", str(threads),
                    "-q"], log_path=str(out) + ".log")


def upstream(hf_source: Path, out: Path, quant: str, threads: int, llama_cpp_dir: Path) -> tuple[Measurement, ...]:
    """convert_hf_to_gguf.py to BF16, then llama.cpp's quantizer; one measurement per step."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    bf16 = out / "upstream-BF16.gguf"
    step1 = measure([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(hf_source), "--outtype",
                     "bf16", "--outfile", str(bf16)], log_path=str(out) + ".convert.log")
    if quant == "BF16" or step1.returncode:
        return (step1,)
    step2 = measure([sys.executable, "-c", _QUANTIZE_SNIPPET, str(bf16), str(out / f"upstream-{quant}.gguf"),
                     quant, str(threads)], log_path=str(out) + ".quantize.log")
    return step1, step2


def upstream_total(hf: Path, out: Path, quant: str, threads: int, llama_cpp_dir: Path) -> Measurement:
    steps = upstream(hf, out, quant, threads, llama_cpp_dir)
    shutil.rmtree(out, ignore_errors=True)
    return Measurement(sum(s.seconds for s in steps), max(s.peak_rss_bytes for s in steps),
                       next((s.returncode for s in steps if s.returncode), 0))


def _median(runs: list[Measurement]) -> tuple[float, float, bool]:
    return (statistics.median(r.seconds for r in runs), statistics.median(r.peak_rss_gb for r in runs),
            any(r.returncode for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wide", help="synthetic shape: tiny, wide (real width) or full")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pixtral-cpp-bench"))
    parser.add_argument("--quants", default="BF16,Q8_0,Q4_K_M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keep", metavar="QUANT", help="keep pixtral-cpp's last QUANT output in WORK/SHAPE-QUANT")
    parser.add_argument("--llama-cpp-dir", type=Path, help="vendor/llama.cpp of the llama-cpp-python sdist")
    args = parser.parse_args()

    work = args.work_dir
    source = ensure_checkpoint(work, args.shape, "hf")
    print(f"checkpoint: {args.shape} shape, transformers layout, "
          f"{sum(f.stat().st_size for f in source.glob('*.safetensors')) / 1e9:.2f} GB; median of {args.runs}")
    print(f"{'type':<8} {'pixtral-cpp s':>13} {'peak GB':>8} {'llama.cpp s':>12} {'peak GB':>8} {'time ratio':>10}")
    for quant in args.quants.split(","):
        mine, theirs = [], []
        for run in range(args.runs):
            out = work / f"{args.shape}-{quant}"  # where bench_describe.py looks for a converted model
            mine.append(ours(source, out, quant, args.threads))
            if not (args.keep == quant and run == args.runs - 1):
                shutil.rmtree(out, ignore_errors=True)
            if args.llama_cpp_dir:
                theirs.append(upstream_total(source, work / f"upstream-{quant}", quant, args.threads,
                                             args.llama_cpp_dir))
        seconds, peak, failed = _median(mine)
        line = f"{quant:<8} {seconds:>13.1f} {peak:>8.2f}" + (" (pixtral-cpp failed, see its .log)" if failed else "")
        if theirs:
            up_seconds, up_peak, up_failed = _median(theirs)
            line += f" {up_seconds:>12.1f} {up_peak:>8.2f} {seconds / up_seconds:>10.2f}"
            line += " (upstream failed)" if up_failed else ""
        print(line, flush=True)


if __name__ == "__main__":
    main()
