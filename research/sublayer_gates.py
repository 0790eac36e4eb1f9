"""Sub-layer gates against block gates on SmolLM2-135M, at the parameter budget of 6 of its 30 blocks.

Each measured point is two CLI commands (gate training took 22 minutes on the shared 2-core CPU):

    OMP_NUM_THREADS=1 foldgpt prune smollm2-135m --method gates --granularity sublayer --target-params 0.8421 \\
        --calibration wikitext2 --nsamples 8 --seqlen 256 --seed 0 --out runs/sublayer-gates-p0842
    foldgpt eval runs/sublayer-gates-p0842 --ppl wikitext2,ptb --seqlen 1024 --max-tokens 16384 \\
        --out runs/sublayer-gates-p0842-ppl.json

(the second point adds ``--gate-lambda-growth 0``, a fixed lambda instead of budget control, into
``runs/sublayer-gates-p0842-fixed``; the third also ``--gate-t 2``, into ``runs/sublayer-gates-p0842-fixed-t2``).

``0.8421`` is 6 blocks' worth of parameters (113,274,432 / 134,515,008 = 0.84210). The same calibration windows and
evaluation protocol as ``benchmarks/removal_methods.py``, whose block-gates row at 6 blocks is the comparison. This
script collects both into one JSON:

    python research/sublayer_gates.py --run runs/sublayer-gates-p0842 --ppl runs/sublayer-gates-p0842-ppl.json \\
        --run runs/sublayer-gates-p0842-fixed --ppl runs/sublayer-gates-p0842-fixed-ppl.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMAND = (
    "OMP_NUM_THREADS=1 foldgpt prune smollm2-135m --method gates --granularity sublayer --target-params 0.8421 {extra}"
    "--calibration wikitext2 --nsamples 8 --seqlen 256 --seed 0 --out {run} && "
    "foldgpt eval {run} --ppl wikitext2,ptb --seqlen 1024 --max-tokens 16384 --out {ppl}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a folder prune wrote (repeat for several)")
    parser.add_argument("--ppl", action="append", required=True, help="the JSON eval wrote for it (same order)")
    parser.add_argument("--baseline", default="benchmarks/results/removal_methods.json")
    parser.add_argument("--out", default="research/results/sublayer_gates.json")
    args = parser.parse_args()

    baseline = json.loads(Path(args.baseline).read_text())
    dense = next(r for r in baseline["rows"] if r["method"] == "dense")
    block = next(r for r in baseline["rows"] if r["method"] == "gates" and r["removed_count"] == 6)
    rows = [row(run, ppl) for run, ppl in zip(args.run, args.ppl, strict=True)]
    result = {
        "model": baseline["model"],
        "calibration": baseline["calibration"],
        "eval_seqlen": 1024,
        "eval_max_tokens": 16384,
        "rows": [
            {"method": "dense", "parameters": dense["parameters"], "perplexity": dense["perplexity"]},
            {"method": "gates (block), 6 blocks", "removed_blocks": block["removed"], "parameters": block["parameters"],
             "perplexity": block["perplexity"], "selection_seconds": block["selection_seconds"],
             "source": args.baseline},
            *rows,
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for entry in result["rows"]:
        print(f"{entry['method']:<50} {entry['parameters']:>12,}  " + "  ".join(f"{k} {v:.2f}" for k, v in entry["perplexity"].items()))


def row(run: str, ppl_file: str) -> dict:
    meta = json.loads((Path(run) / "foldgpt.json").read_text())
    ppl = json.loads(Path(ppl_file).read_text())["perplexity"]
    details = meta["details"]
    gates = details["final_gates"]
    hyper = details["hyperparameters"]
    fixed = hyper["lam_growth"] == 0
    extra = ("--gate-lambda-growth 0 " if fixed else "") + (f"--gate-t {hyper['t']:g} " if hyper["t"] != 1.0 else "")
    label = f", fixed lambda {hyper['lam']}" if fixed else ", budget control"
    return {
        "method": "gates, --granularity sublayer" + label + (f", t {hyper['t']:g}" if hyper["t"] != 1.0 else ""),
        "command": COMMAND.format(extra=extra, run=run, ppl=ppl_file),
        "target": meta["target"],
        "removed_blocks": meta["removed"],
        "removed_sublayers_of_kept_blocks": meta["removed_sublayers"],
        "closed_sublayers": details["closed_sublayers"],
        "sublayers_removed": meta["sublayers_removed"],
        "parameters": meta["parameters_after"],
        "parameters_plain_folder": meta["parameters_after_plain"],
        "flops_per_token_fraction": meta["flops_per_token_after"] / meta["flops_per_token_before"],
        "perplexity": {name: result["perplexity"] for name, result in ppl.items()},
        "eval_tokens": {name: result["tokens"] for name, result in ppl.items()},
        "selection_seconds": meta["selection_seconds"],
        "final_gates": {"attention": gates[0::2], "mlp": gates[1::2]},
        "final_lambda": details["lambda_history"][-1],
        "hyperparameters": details["hyperparameters"],
    }


if __name__ == "__main__":
    main()
