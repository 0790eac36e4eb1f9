"""Choose the gate-training defaults on validation data only (never on a test split).

    python research/tune_gates.py --configs '[{"lam": 0.1}, {"lam": 0.5}, {"lam": 2.0}]'

For each GateConfig override: train gates once on the standard calibration windows (wikitext2 validation, 8 x 256
tokens, seed 0), then for each target remove the blocks with the smallest gates and measure perplexity on held-out
*validation* text (WikiText-2 validation and PTB validation, first ``--max-tokens`` tokens, windows of 1024).
Prints a table and writes JSON; the best config by mean log-perplexity becomes ``GateConfig``'s default.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, load_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import load_model
from foldgpt.selection.config import GateConfig
from foldgpt.selection.gates import selection_from_gates, train_gates
from foldgpt.surgery.removal import remove_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", default='[{}]', help="JSON list of GateConfig overrides")
    parser.add_argument("--remove", default="4,6,8")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--out", default="research/results/tune_gates.json")
    args = parser.parse_args()
    loaded = load_model(args.model)
    calibration = load_windows(loaded.tokenizer, "wikitext2", 8, 256, 0)
    held_out = {name: evaluation_windows(tokenize(loaded.tokenizer, load_text(name, "calibration")), 1024, args.max_tokens)
                for name in ("wikitext2", "ptb")}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else []
    for overrides in json.loads(args.configs):
        config = GateConfig(**overrides)
        for n_remove in [int(n) for n in args.remove.split(",")]:
            if n_remove == int(args.remove.split(",")[0]) or config.lam_growth > 0:  # budget control trains per target
                start = time.perf_counter()
                trained = train_gates(loaded.model, calibration, config, seed=0, n_remove=n_remove)
                seconds = time.perf_counter() - start
            removed = selection_from_gates(trained, n_remove).removed
            model = remove_blocks(copy.deepcopy(loaded.model), removed)
            ppl = {name: windows_perplexity(model, windows) for name, windows in held_out.items()}
            row = {"config": overrides, "removed_count": n_remove, "removed": removed, "validation_perplexity": ppl,
                   "mean_log_ppl": sum(math.log(v) for v in ppl.values()) / len(ppl), "train_seconds": seconds,
                   "final_gates": trained.gates}
            results.append(row)
            print(json.dumps({k: row[k] for k in ("config", "removed_count", "removed", "validation_perplexity")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
