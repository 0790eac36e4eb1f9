"""Healing probes: does a short heal rank removal sets the way a full heal does?

    OMP_NUM_THREADS=2 python research/heal_probe.py --set gates6=4,5,13,14,25,26 --set bi6=12-14,17,25,26 --steps 8

Each ``--set NAME=BLOCKS`` is removed from a copy of the dense model (``foldgpt.selection.candidates.without``), healed for ``--steps`` steps of
``--seqlen`` Alpaca tokens (the healing defaults otherwise: KL + tail + LM, LoRA rank 8), and scored before and after
on held-out *calibration-domain* text: the first ``--probe-tokens`` tokens of the WikiText-2 validation split in
windows of ``--seqlen`` (never the test split, so a probe may be used to choose a set). The question it answers:
the full heal (``benchmarks/healing.py``) ends lower for bi's sets than for the gates' although the gates' start lower;
if a probe of a few steps already orders them that way, a set can be chosen by probe instead of by pre-healing damage.

Results accumulate in ``--out`` (JSON); sets already there with the same settings are skipped. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import foldgpt
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.selection.candidates import heldout_windows, without
from foldgpt.selection.config import ProbeConfig
from foldgpt.workflows.prune import parse_blocks


def validation_ppl(loaded, windows: torch.Tensor) -> float:
    return windows_perplexity(loaded.model, windows, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=BLOCKS", help="e.g. bi6=12-14,17,25,26")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--probe-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-cache", default="runs/heal-bench/teacher-cache-seed0-seqlen1024",
                        help="shared with benchmarks/healing.py (same data, seed, window length and held-out windows)")
    parser.add_argument("--out", default="research/results/heal_probe.json")
    args = parser.parse_args()
    out = Path(args.out)
    settings = {"model": args.model, "steps": args.steps, "seqlen": args.seqlen, "probe_tokens": args.probe_tokens,
                "seed": args.seed}
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "threads": torch.get_num_threads(), "sets": {}}
    teacher = foldgpt.load(args.model)
    windows = heldout_windows(teacher, ProbeConfig(seqlen=args.seqlen, eval_tokens=args.probe_tokens))
    if "dense" not in results:
        results["dense"] = validation_ppl(teacher, windows)
    config = HealConfig(steps=args.steps, seqlen=args.seqlen, seed=args.seed, eval_windows=4, checkpoint_every=0,
                        teacher_cache=args.teacher_cache)
    for spec in args.set:
        name, blocks_spec = spec.split("=", 1)
        if name in results["sets"]:
            continue
        blocks = sorted(parse_blocks(blocks_spec))
        student = without(teacher, blocks)
        before = validation_ppl(student, windows)
        start = time.perf_counter()
        result = heal(student, teacher, config)
        seconds = time.perf_counter() - start
        after = validation_ppl(result.loaded, windows)
        results["sets"][name] = {"blocks": blocks, "ppl_before": before, "ppl_after": after, "heal_seconds": seconds,
                                 "heldout_alpaca_after": result.evals[-1]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name} {blocks}: validation ppl {before:.2f} -> {after:.2f} ({seconds:.0f}s)", flush=True)
    print(f"dense: WikiText-2 validation ppl {results['dense']:.2f}")
    print(f"| set | blocks | WikiText-2 validation ppl before | after {args.steps} steps x {args.seqlen} |")
    print("|---|---|---|---|")
    for name, row in results["sets"].items():
        print(f"| {name} | {' '.join(map(str, row['blocks']))} | {row['ppl_before']:.2f} | {row['ppl_after']:.2f} |")


if __name__ == "__main__":
    main()
