"""Wall time of ``foldgpt --help`` (and of a command's ``--help``): the parser is built from the torch-free config
dataclasses, so asking for help must not wait for torch, transformers or lm-eval to import. Target: at most 2 s.

    python benchmarks/cli_startup.py --runs 5 --out benchmarks/results/cli_startup.json

Each run is a fresh interpreter (``python -m foldgpt.cli ARGS``, what the ``foldgpt`` script does plus the ``-m``
lookup), timed from start to exit; the median of the runs is reported, and the exit status is 1 if any median is
above the target. Also reported, for scale: a bare interpreter, and one that imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 2.0
COMMANDS = {"foldgpt --help": ["-m", "foldgpt.cli", "--help"], "foldgpt prune --help": ["-m", "foldgpt.cli", "prune", "--help"],
            "foldgpt compress --help": ["-m", "foldgpt.cli", "compress", "--help"]}
REFERENCES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}


def wall_seconds(arguments: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *arguments], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per command (default: 5)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results = {}
    for name, arguments in {**COMMANDS, **REFERENCES}.items():
        times = wall_seconds(arguments, args.runs)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": args.runs}
        print(f"{name:<28} median {results[name]['median_s']:.3f} s (min {min(times):.3f}, max {max(times):.3f})")
    slow = [name for name in COMMANDS if results[name]["median_s"] > TARGET_SECONDS]
    print(f"target <= {TARGET_SECONDS:.1f} s: " + (f"missed by {', '.join(slow)}" if slow else "met"))
    if args.out:
        args.out.write_text(json.dumps({"target_s": TARGET_SECONDS, "results": results}, indent=2) + "\n")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
