"""Conversion benchmark: pixtral-cpp vs llama.cpp's own route, same checkpoint, same run.

    python benchmarks/bench_convert.py --shape wide --work-dir /tmp/bench \
        --llama-cpp-dir /path/to/llama_cpp_python-0.3.36/vendor/llama.cpp

For each output type: wall time and peak RSS of `pixtral-cpp convert` (one process), and of
llama.cpp's route (convert_hf_to_gguf.py --outtype bf16, then its quantizer for quantized types),
each in its own process. The llama.cpp route covers the text model only: its mmproj route does not
produce a loadable Pixtral projector in this version (pixtral-gguf-facts.md §0.1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from measure import Measurement, measure

from pixtral_cpp.synthetic import write_synthetic_checkpoint

_QUANTIZE_SNIPPET = (
    "import sys; from pixtral_cpp.backend.quantize import LLAMA_FTYPES, quantize_gguf; "
    "quantize_gguf(sys.argv[1], sys.argv[2], LLAMA_FTYPES[sys.argv[3]], threads=int(sys.argv[4]))"
)


def ensure_checkpoint(work: Path, shape: str, layout: str) -> Path:
    folder = work / f"{shape}-{layout}" / f"Pixtral-{shape}"
    if not (folder / ("params.json" if layout == "native" else "config.json")).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        # llama.cpp's HF route reads tekken.json when there is no tokenizer.json
        write_synthetic_checkpoint(folder, layout=layout, shape=shape, seed=0,
                                   **({"hf_tokenizer_files": ("tekken.json",)} if layout == "hf" else {}))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wide", help="synthetic shape: tiny, wide (real width) or full")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pixtral-cpp-bench"))
    parser.add_argument("--quants", default="BF16,Q8_0,Q4_K_M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp-dir", type=Path, help="vendor/llama.cpp of the llama-cpp-python sdist")
    args = parser.parse_args()

    work = args.work_dir
    native = ensure_checkpoint(work, args.shape, "native")
    hf = ensure_checkpoint(work, args.shape, "hf") if args.llama_cpp_dir else None
    print(f"checkpoint: {args.shape} shape, {sum(f.stat().st_size for f in native.glob('*.safetensors')) / 1e9:.2f} GB")
    print(f"{'type':<8} {'pixtral-cpp s':>13} {'peak GB':>8} {'llama.cpp s':>12} {'peak GB':>8} {'time ratio':>10}")
    for quant in args.quants.split(","):
        mine = ours(native, work / f"out-{quant}", quant, args.threads)
        line = f"{quant:<8} {mine.seconds:>13.1f} {mine.peak_rss_gb:>8.2f}"
        if mine.returncode:
            line += f"  (pixtral-cpp failed, see {work}/out-{quant}.log)"
        if hf is not None:
            steps = upstream(hf, work / f"upstream-{quant}", quant, args.threads, args.llama_cpp_dir)
            seconds, peak = sum(s.seconds for s in steps), max(s.peak_rss_gb for s in steps)
            failed = any(s.returncode for s in steps)
            line += f" {seconds:>12.1f} {peak:>8.2f} {mine.seconds / seconds:>10.2f}"
            line += " (upstream failed)" if failed else ""
        print(line, flush=True)
        shutil.rmtree(work / f"out-{quant}", ignore_errors=True)
        shutil.rmtree(work / f"upstream-{quant}", ignore_errors=True)


if __name__ == "__main__":
    main()
