"""How fast the command line starts: median wall time of fresh interpreters, and what they import.

    python benchmarks/bench_startup.py                    # the checkout in the current folder
    cd /tmp/before && python /work/main/benchmarks/bench_startup.py   # another one (a git worktree)
    python benchmarks/bench_startup.py --info MODEL.gguf  # also `pixtral-cpp info` on a real pair

Each case runs in a new subprocess in the current folder, which comes first on `sys.path` (before an
editable install); the first line says which pixtral_cpp was measured. The module count comes from
`-X importtime`. Figures, not a test: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

# The console script does exactly this (pyproject.toml: pixtral-cpp = "pixtral_cpp.cli:main").
ENTRY_POINT = "import sys; from pixtral_cpp.cli import main; sys.argv[0] = 'pixtral-cpp'; main()"


def cases(info_model: str | None) -> dict[str, list[str]]:
    python = sys.executable
    table = {
        "python -m pixtral_cpp.cli --help": [python, "-m", "pixtral_cpp.cli", "--help"],
        "pixtral-cpp info --help": [python, "-c", ENTRY_POINT, "info", "--help"],
        "import pixtral_cpp": [python, "-c", "import pixtral_cpp"],
        "python -c pass (interpreter alone)": [python, "-c", "pass"],
    }
    if info_model:
        table[f"pixtral-cpp info {os.path.basename(info_model)}"] = [python, "-c", ENTRY_POINT, "info", info_model]
    return table


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def imported_modules(command: list[str]) -> list[str]:
    """The modules the command imports, from `-X importtime` (its lines go to stderr)."""
    run = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, check=True)
    return [line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")
            and "imported package" not in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs per case (the median is printed)")
    parser.add_argument("--info", metavar="MODEL", help="a text GGUF, to time `pixtral-cpp info MODEL` too")
    args = parser.parse_args()
    where = subprocess.run([sys.executable, "-c", "import pixtral_cpp; print(pixtral_cpp.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"pixtral_cpp from {where}; median of {args.runs} runs")
    print(f"{'case':<44}{'seconds':>9}{'pixtral_cpp':>13}{'modules':>9}  heavy")
    for name, command in cases(args.info).items():
        seconds = median_seconds(command, args.runs)
        modules = imported_modules(command)
        ours = sum(m.split(".")[0] == "pixtral_cpp" for m in modules)
        heavy = sorted({m.split(".")[0] for m in modules} & {"numpy", "gguf", "PIL", "llama_cpp", "torch"})
        print(f"{name:<44}{seconds:>9.3f}{ours:>13}{len(modules):>9}  {' '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
