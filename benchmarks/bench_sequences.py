"""Aggregate generation speed of 1, 2, 4 ... sequences decoded together (backend/sequences.py, docs/parallel.md).

    python benchmarks/bench_sequences.py                        # a tiny random Pixtral, made in a temp folder
    python benchmarks/bench_sequences.py --model TEXT.gguf --threads 2 --steps 16

Each sequence is prefilled with its own prompt, then every step decodes one greedy token of each in one
`decode_step`: aggregate tokens/s = sequences x steps / time. Figures, not a test: they depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def tiny_model(folder: Path) -> Path:
    from pixtral_cpp.convert import ConvertOptions, convert_checkpoint
    from pixtral_cpp.synthetic import write_synthetic_checkpoint

    source = write_synthetic_checkpoint(folder / "Pixtral-tiny", layout="native", shape="tiny", seed=1234)
    return convert_checkpoint(ConvertOptions(source=source, output_dir=folder / "gguf", quant="F16")).text_path


def measure(path: Path, n_seq: int, threads: int, prompt: int, steps: int, logits: bool = True) -> float:
    """Generated tokens per second of `n_seq` sequences decoding together (without logits: the same token
    again, no output layer, what the step costs besides it)."""
    import numpy as np

    from pixtral_cpp.backend import Piece, TextModel, TextModelOptions, decode_step

    options = TextModelOptions(n_ctx=prompt + steps + 16, n_batch=512, n_threads=threads, n_seq=n_seq)
    logits_wanted = logits
    with TextModel(path, options) as text:
        rng = np.random.default_rng(n_seq)
        prompts = [[1, 3, *rng.integers(5, text.n_vocab, prompt - 3).tolist(), 4] for _ in range(n_seq)]
        logits = decode_step(text, [Piece.of_tokens(seq, ids) for seq, ids in enumerate(prompts)])
        started = time.perf_counter()
        for _ in range(steps):
            if not logits_wanted:
                decode_step(text, [Piece.of_tokens(seq, [7], logits=False) for seq in range(n_seq)])
                continue
            logits = decode_step(text, [Piece.of_tokens(seq, [int(row.argmax())]) for seq, row in logits.items()])
        return n_seq * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a text GGUF (default: a tiny random Pixtral)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=128, help="decode steps (tokens per sequence)")
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--without-logits", action="store_true", help="no output layer: the rest of a step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp))
        print(f"{path.name}, {args.threads} threads, {args.prompt}-token prompts, {args.steps} steps", file=sys.stderr)
        base = None
        for n_seq in args.sequences:
            rate = measure(path, n_seq, args.threads, args.prompt, args.steps, not args.without_logits)
            base = base or rate
            print(f"{n_seq} sequences: {rate:8.1f} tok/s aggregate ({rate / base:.2f}x)")


if __name__ == "__main__":
    main()
