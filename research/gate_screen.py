"""Does a held-out screen of the gates' near-tied sets pick better blocks *before* healing?

    OMP_NUM_THREADS=1 python research/gate_screen.py --gates 4=research/results/gate_stability_restarts_r4.json \
        --gates 6=research/results/gate_stability_restarts_r6.json --gates 8=runs/g8/foldgpt.json

For each target, the gates' per-block scores (a ``foldgpt prune --method gates`` folder's ``foldgpt.json``, or a
``research/gate_stability.py`` result with a trajectory record, whose runs are combined by ``ensemble_gates`` as
``--gate-restarts`` does) give the same candidates as the healing probes' screen (``candidate_sets``: the
``--screen`` sets with the smallest summed gates among the N + ``--pool`` lowest). Each is scored without healing on
the first ``--screen-tokens`` of WikiText-2 validation (what ``choose_by_probe`` screens on). The lowest is the
screen's pick. The gates' own pick and the screen's are then judged on text the screen never saw: WikiText-2
validation tokens after the screened ones (``--judge-tokens``) and PTB validation (its first ``--judge-tokens``).
No test split is read. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import foldgpt
from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.selection.candidates import candidate_sets, screen_sets, without
from foldgpt.selection.config import ProbeConfig
from foldgpt.selection.gates import ensemble_gates


def gate_scores(path: Path) -> list[float]:
    """Per-block gate scores from a prune folder's ``foldgpt.json`` or a gate_stability trajectory record."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return data["scores"]
    record = next(r for r in data if r.get("rule") == "trajectory")
    history, runs = record["gate_history"], record.get("overrides", {}).get("restarts", 1)
    steps = len(history) // runs
    return ensemble_gates([history[i * steps : (i + 1) * steps] for i in range(runs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gates", action="append", required=True, metavar="N=PATH",
                        help="blocks to remove and where their gate scores are (repeatable)")
    defaults = ProbeConfig()
    parser.add_argument("--screen", type=int, default=defaults.screen)
    parser.add_argument("--pool", type=int, default=defaults.pool)
    parser.add_argument("--seqlen", type=int, default=defaults.seqlen)
    parser.add_argument("--screen-tokens", type=int, default=defaults.screen_tokens)
    parser.add_argument("--judge-tokens", type=int, default=16384)
    parser.add_argument("--out", default="research/results/gate_screen.json")
    args = parser.parse_args()
    dense = foldgpt.load(args.model)
    wiki = tokenize(dense.tokenizer, load_text("wikitext2", "calibration"))
    screen_windows = evaluation_windows(wiki, args.seqlen, args.screen_tokens)
    judge = {
        "wikitext2_val_after_screen": evaluation_windows(wiki[args.screen_tokens :], args.seqlen, args.judge_tokens),
        "ptb_val": evaluation_windows(tokenize(dense.tokenizer, load_text("ptb", "calibration")), args.seqlen,
                                      args.judge_tokens),
    }
    results = []
    for spec in args.gates:
        n_text, path = spec.split("=", 1)
        n_remove, scores = int(n_text), gate_scores(Path(path))
        start = time.perf_counter()
        candidates = candidate_sets(scores, n_remove, args.screen, args.pool)
        screened = screen_sets(dense, candidates, screen_windows)
        screen_seconds = time.perf_counter() - start
        picks = {"gates": candidates[0], "screen": min(screened, key=lambda r: r["ppl_before"])["removed"]}
        judged = {}
        for name, removed in picks.items():
            student = without(dense, removed)
            judged[name] = {data: windows_perplexity(student.model, windows, progress=False) for data, windows in judge.items()}
            judged[name]["mean_log_ppl"] = sum(math.log(v) for v in judged[name].values()) / len(judge)
        results.append({"remove": n_remove, "gates_from": path, "scores": scores, "screened": screened,
                        "picks": picks, "judged": judged, "screen_seconds": screen_seconds})
        for name, removed in picks.items():
            j = judged[name]
            print(f"| {n_remove} | {name} | {' '.join(map(str, removed))} | {j['wikitext2_val_after_screen']:.2f} | "
                  f"{j['ptb_val']:.2f} | {j['mean_log_ppl']:.4f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
