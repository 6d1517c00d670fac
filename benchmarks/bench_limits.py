"""How far generation and prefill are from this machine's limits.

    python benchmarks/bench_limits.py MODEL.gguf --threads 2 [--gen-tok-s 2.9 --prompt-tok-s 21.4]

Measures the machine (peak.c: read bandwidth, int8 dot-product and float32 FMA throughput on --threads
threads), reads the model's tensor sizes from its GGUF header, and prints the two ceilings:
- generation reads every weight once per token (all but the token embedding, of which one row):
  tokens/s <= bandwidth / bytes per token;
- prefill multiplies every weight with every token: a K-quant matmul runs as int8 dot products
  against 8-bit activations, so tokens/s <= int8 ops per s / (2 x weights per token).
Given measured speeds, it prints what fraction of each ceiling they reach.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pixtral_cpp.gguf_file import read_gguf_header  # noqa: E402

HERE = Path(__file__).resolve().parent


def machine_peaks(threads: int, build_dir: Path) -> dict[str, float]:
    exe = build_dir / "peak"
    if not exe.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-O2", "-march=native", "-fopenmp", str(HERE / "peak.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def model_costs(path: Path) -> tuple[float, float]:
    """(bytes read per generated token, multiply-adds per token) of a text GGUF."""
    header = read_gguf_header(path)
    embedding = header.tensors["token_embd.weight"]
    read = sum(t.nbytes for t in header.tensors.values()) - embedding.nbytes + embedding.nbytes // embedding.ne[1]
    macs = sum(t.ne[0] * t.ne[1] for name, t in header.tensors.items()
               if len(t.ne) == 2 and name != "token_embd.weight")
    return float(read), float(macs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen-tok-s", type=float, help="measured generation speed")
    parser.add_argument("--prompt-tok-s", type=float, help="measured prompt (prefill) speed")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/pixtral-cpp-bench/peak"))
    args = parser.parse_args()

    peaks = machine_peaks(args.threads, args.build_dir)
    bytes_per_token, macs_per_token = model_costs(args.model)
    gen_ceiling = peaks["read_bytes_per_s"] / bytes_per_token
    prefill_ceiling = peaks["int8_ops_per_s"] / (2 * macs_per_token) if peaks["int8_ops_per_s"] else float("nan")
    print(f"machine, {peaks['threads']} threads: read {peaks['read_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"int8 {peaks['int8_ops_per_s'] / 1e12:.2f} Tops/s, f32 {peaks['f32_flops_per_s'] / 1e9:.0f} GFLOP/s")
    print(f"model: {bytes_per_token / 1e9:.2f} GB read per generated token, "
          f"{macs_per_token / 1e9:.2f} G multiply-adds per token")
    print(f"generation ceiling {gen_ceiling:.2f} tok/s" +
          (f"; measured {args.gen_tok_s:.2f} = {args.gen_tok_s / gen_ceiling:.0%} of it, "
           f"{args.gen_tok_s * bytes_per_token / 1e9:.1f} GB/s" if args.gen_tok_s else ""))
    print(f"prefill ceiling {prefill_ceiling:.1f} tok/s" +
          (f"; measured {args.prompt_tok_s:.1f} = {args.prompt_tok_s / prefill_ceiling:.0%} of it"
           if args.prompt_tok_s else ""))


if __name__ == "__main__":
    main()
