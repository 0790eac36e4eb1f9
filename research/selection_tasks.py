"""The five zero-shot tasks (first ``--limit`` documents of each, 0-shot) of given removal sets, the blocks taken out
in place: the task columns of docs/results/gate-selection.md's grid.

    OMP_NUM_THREADS=1 python research/selection_tasks.py smollm2-135m research/results/selection_tasks_smollm2-135m_r10.json \
        3,4,5,6,7,12,13,14,25,26 3,7,12,13,14,15,16,17,25,26

Results are written after each set, so a stopped run keeps the sets it finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foldgpt.eval.lm_tasks import DEFAULT_TASKS, evaluate_tasks
from foldgpt.formats.loading import load_model
from foldgpt.surgery.removal import blocks_removed_temporarily


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("sets", nargs="+", help="comma-separated blocks to remove, one argument per set")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    loaded = load_model(args.model)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for text in args.sets:
        if text in results:
            continue
        removed = [int(block) for block in text.split(",")]
        with blocks_removed_temporarily(loaded.model, removed) as model:
            outcome = evaluate_tasks(model, loaded.tokenizer, DEFAULT_TASKS, limit=args.limit)
        results[text] = {"metrics": outcome.metrics, "samples": outcome.samples, "seconds": outcome.seconds}
        print(text, json.dumps(outcome.metrics), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
