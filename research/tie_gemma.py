"""Why do fitted ties lose on Gemma-3-270M? One tie at a time, before healing (issue 22)

At 6 blocks removed (8 9 13 14 15 17) ``--fold auto``'s tie candidate keeps block 13 and ties 1->2 and 11->10; it
scored 6,364 on held-out WikiText-2 validation against removal's 792, and 447 against 186 after the heal
(docs/results/fold-vs-remove.md). Gemma-3 alternates five sliding-window (local) layers with one global layer, each
type with its own RoPE base; block 11 is global, 10 and 1-2 local. This script fits each tie alone and both together
on the candidate's removal (``TieConfig()``) and scores each model, unhealed, on the held-out windows ``--fold auto``
uses, with each tie's local reconstruction error before and after its fit.

    OMP_NUM_THREADS=1 python research/tie_gemma.py --out research/results/tie_gemma.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import load_model
from foldgpt.surgery.config import TieConfig
from foldgpt.surgery.removal import remove_blocks
from foldgpt.workflows.fold import tie_model
from foldgpt.workflows.fold_plan import fit_and_check_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--removed", default="8,9,14,15,17", help="the tie candidate's removal")
    parser.add_argument("--plans", default=",1:2,11:10,1:2;11:10", help="tie specs separated by ',' (';' joins ties)")
    parser.add_argument("--fit-windows", type=int, default=TieConfig().fit_windows)
    parser.add_argument("--fit-seqlen", type=int, default=TieConfig().fit_seqlen, help="tokens per fitting window (the "
                        "held-out windows stay those of TieConfig())")
    parser.add_argument("--fit-seed", type=int, default=TieConfig().seed, help="seed of the fitting windows (with "
                        "--fit-seqlen 1024 on Gemma-3, 3 keeps them off the held-out windows, the first 10,240 tokens)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    removed = [int(b) for b in args.removed.split(",")]
    dense = load_model(args.model)
    _, held_out = fit_and_check_windows(dense.tokenizer, TieConfig())
    fitting = replace(TieConfig(), fit_windows=args.fit_windows, fit_seqlen=args.fit_seqlen, seed=args.fit_seed)
    record: dict = {"model": args.model, "removed": removed, "layer_types": getattr(dense.model.config, "layer_types", None),
                    "held_out_tokens": int(held_out.numel()),
                    "fit": {"windows": args.fit_windows, "seqlen": args.fit_seqlen, "seed": args.fit_seed}, "rows": []}
    for spec in args.plans.split(","):
        start = time.perf_counter()
        student = load_model(args.model)
        remove_blocks(student.model, removed)
        fits: list = []
        model = student.model
        if spec:
            tied = tie_model(student, dense, replace(fitting, ties=spec.replace(";", ",")), removed=removed)
            model, fits = tied.loaded.model, tied.metadata["tie_fits"]
        row = {"ties": spec.replace(";", ","), "perplexity": windows_perplexity(model, held_out, progress=False),
               "local_error": [{"child": fit["child"], "before": fit["losses"][0], "after": fit["losses"][-1]} for fit in fits],
               "seconds": time.perf_counter() - start}
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
