"""Does ``--fold auto`` choose right when it heals its candidates first? (issue 22)

``--fold auto`` compares removal only against removing one block fewer plus the fewest fitted ties at the same unique
parameters. Judged unhealed, the ties led by 38-99%, but after the default heal they were level with removal at -25%
parameters on validation text and behind it on test (docs/results/fold-vs-remove.md). This script runs the product's
``fold_auto`` with and without its probe heal (``HealConfig()``, the heal ``compress`` runs next: 25 x 1,024 Alpaca
tokens, seed 0) on a removal and records, per candidate, the held-out perplexity before and after that heal
(WikiText-2 validation windows of 1,024 that skip the tie-fitting windows: validation text, for choosing) and the
choice each rule makes. Removals: Block Influence's at ``--targets`` (fractions of the parameters, as
``--target-params``), and any ``--sets NAME=BLOCKS`` (e.g. the gates' removal at a target).

    OMP_NUM_THREADS=1 python research/fold_probe.py smollm2-135m --targets 0.75,0.60 \
        --sets gates-0.75=3,4,5,6,7,12,13,14,25,26 --out research/results/fold_probe_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from foldgpt.formats.loading import load_model
from foldgpt.healing.config import HealConfig
from foldgpt.surgery.config import TieConfig
from foldgpt.workflows.fold_plan import fold_auto
from foldgpt.workflows.prune import prune


def point(model: str, name: str, target: float | None, blocks: list[int] | None) -> dict:
    """``fold_auto`` with the probe heal on one removal; both candidates' scores, before and after it."""
    start = time.perf_counter()
    pruned = prune(load_model(model), "bi" if blocks is None else "gates", target_params=target, blocks=blocks)
    removed = pruned.metadata["removed"]
    result = fold_auto(pruned.loaded, load_model(model), load_model(model), removed, TieConfig(), probe=HealConfig())
    candidates = result.metadata["fold_candidates"]
    return {"point": name, "removed": removed, "candidates": candidates,
            "choice_unhealed": min(candidates, key=lambda c: c["perplexity"])["name"],
            "choice_after_probe": result.metadata["fold_choice"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--targets", default="0.75,0.60", help="Block Influence's removal at these --target-params")
    parser.add_argument("--sets", action="append", default=[], metavar="NAME=BLOCKS", help="a given removal, e.g. "
                        "gates-0.75=3,4,5,6,7,12,13,14,25,26")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"model": args.model, "points": []}
    done = {row["point"] for row in record["points"]}
    todo: list[tuple[str, float | None, list[int] | None]] = [(f"bi-{t}", float(t), None) for t in args.targets.split(",") if t]
    for spec in args.sets:
        name, blocks = spec.split("=")
        todo.append((name, None, [int(b) for b in blocks.split(",")]))
    for name, target, blocks in todo:
        if name in done:
            continue
        row = point(args.model, name, target, blocks)
        record["points"].append(row)
        out.write_text(json.dumps(record, indent=1))
        print(json.dumps({k: row[k] for k in ("point", "choice_unhealed", "choice_after_probe", "seconds")}), flush=True)
        for candidate in row["candidates"]:
            print(f"  {candidate['name']}: {candidate['perplexity']:.2f} -> {candidate.get('perplexity_healed', float('nan')):.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
