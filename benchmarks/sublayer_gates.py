"""Sub-layer gates against block gates on SmolLM2-135M, at the parameter budget of 6 of its 30 blocks.

The measurement is two CLI commands (gate training takes about half an hour on the shared 2-core CPU):

    OMP_NUM_THREADS=1 foldgpt prune smollm2-135m --method gates --granularity sublayer --target-params 0.8421 \\
        --calibration wikitext2 --nsamples 8 --seqlen 256 --seed 0 --out runs/sublayer-gates-p0842
    foldgpt eval runs/sublayer-gates-p0842 --ppl wikitext2,ptb --seqlen 1024 --max-tokens 16384 \\
        --out runs/sublayer-gates-p0842-ppl.json

``0.8421`` is 6 blocks' worth of parameters (113,274,432 / 134,515,008 = 0.84210). The same calibration windows and
evaluation protocol as ``benchmarks/removal_methods.py``, whose block-gates row at 6 blocks is the comparison. This
script collects both into one JSON:

    python benchmarks/sublayer_gates.py --run runs/sublayer-gates-p0842 --ppl runs/sublayer-gates-p0842-ppl.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMAND = (
    "OMP_NUM_THREADS=1 foldgpt prune smollm2-135m --method gates --granularity sublayer --target-params 0.8421 "
    "--calibration wikitext2 --nsamples 8 --seqlen 256 --seed 0 --out runs/sublayer-gates-p0842 && "
    "foldgpt eval runs/sublayer-gates-p0842 --ppl wikitext2,ptb --seqlen 1024 --max-tokens 16384 "
    "--out runs/sublayer-gates-p0842-ppl.json"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/sublayer-gates-p0842", help="the folder prune wrote")
    parser.add_argument("--ppl", default="runs/sublayer-gates-p0842-ppl.json", help="the JSON eval wrote")
    parser.add_argument("--baseline", default="benchmarks/results/removal_methods.json")
    parser.add_argument("--out", default="benchmarks/results/sublayer_gates.json")
    args = parser.parse_args()

    meta = json.loads((Path(args.run) / "foldgpt.json").read_text())
    ppl = json.loads(Path(args.ppl).read_text())["perplexity"]
    baseline = json.loads(Path(args.baseline).read_text())
    dense = next(r for r in baseline["rows"] if r["method"] == "dense")
    block = next(r for r in baseline["rows"] if r["method"] == "gates" and r["removed_count"] == 6)
    details = meta["details"]
    gates = details["final_gates"]
    sublayer = {
        "method": "gates, --granularity sublayer",
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
    result = {
        "model": meta["source_model"],
        "calibration": meta["calibration"],
        "eval_seqlen": 1024,
        "eval_max_tokens": 16384,
        "command": COMMAND,
        "rows": [
            {"method": "dense", "parameters": dense["parameters"], "perplexity": dense["perplexity"]},
            {"method": "gates (block), 6 blocks", "removed_blocks": block["removed"], "parameters": block["parameters"],
             "perplexity": block["perplexity"], "selection_seconds": block["selection_seconds"],
             "source": args.baseline},
            sublayer,
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(f"{row['method']:<32} {row['parameters']:>12,}  " + "  ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items()))


if __name__ == "__main__":
    main()
