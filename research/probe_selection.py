"""Healing probes on SmolLM2-135M: which set do they choose from the gates' scores, and at what cost?

    OMP_NUM_THREADS=2 python research/probe_selection.py --gates runs/main/pruned --sets 3 --screen 24

Reads the gates' per-block scores from a ``foldgpt prune --method gates`` folder (its ``foldgpt.json``; by default the
``./run.sh`` pipeline's pruned stage: 6 blocks, the default ``GateConfig``) and runs exactly what ``prune
--gate-probe-sets K`` runs after gate training (``foldgpt.workflows.probe.choose_by_probe``), so the 3 x 80 gate steps
are not trained again. Prints the screened and healed candidates and writes JSON; heal the chosen set with
``benchmarks/healing.py --student NAME=DIR`` to see whether it heals better in full.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import foldgpt
from foldgpt.selection.config import ProbeConfig
from foldgpt.workflows.probe import choose_by_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gates", default="runs/main/pruned", help="a pruned folder whose foldgpt.json holds gate scores")
    defaults = ProbeConfig()
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--screen", type=int, default=defaults.screen)
    parser.add_argument("--pool", type=int, default=defaults.pool)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--probe-tokens", type=int, default=defaults.eval_tokens,
                        help="held-out tokens the healed probes are scored on (the screen: the first 8,192)")
    parser.add_argument("--out", default="research/results/probe_selection.json")
    args = parser.parse_args()
    metadata = json.loads((Path(args.gates) / "foldgpt.json").read_text())
    if metadata.get("method") != "gates":
        raise SystemExit(f"{args.gates}: not a gates selection (method {metadata.get('method')!r})")
    config = ProbeConfig(sets=args.sets, screen=args.screen, pool=args.pool, steps=args.steps, eval_tokens=args.probe_tokens)
    start = time.perf_counter()
    outcome = choose_by_probe(foldgpt.load(args.model), metadata["scores"], len(metadata["removed"]), config)
    outcome.update(seconds=time.perf_counter() - start, threads=torch.get_num_threads(), gates=args.gates,
                   gates_removed=metadata["removed"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(outcome, indent=2) + "\n")
    healed = {tuple(record["removed"]): record["ppl_after"] for record in outcome["candidates"]}
    print(f"| set (gate sum order) | validation ppl before | after {args.steps} steps |")
    print("|---|---|---|")
    for record in outcome["screened"]:
        after = healed.get(tuple(record["removed"]))
        print(f"| {' '.join(map(str, record['removed']))} | {record['ppl_before']:.2f} | "
              f"{'' if after is None else f'{after:.2f}'} |")
    print(f"chosen: {outcome['chosen']} (the gates' own pick: {outcome['first']}); {outcome['seconds']:.0f} s")


if __name__ == "__main__":
    main()
