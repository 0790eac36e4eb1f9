"""Replay the gate selection's screen on recorded gate scores: the gates' near-ties and the baselines' sets (bi,
angular), each scored with its blocks really removed on held-out WikiText-2 validation windows that skip the
calibration windows (what ``prune --method gates`` does by default since 0.2.0), then the test-split perplexity of the
sets that matter (the gates' own pick, the old screen's pick, the new pick, bi, angular).

    python research/selection_candidates.py MODEL --remove 4 --gates runs/gemma-g4/foldgpt.json \
        --out research/results/selection_candidates_gemma3-270m_r4.json

Without ``--gates`` only the baselines are scored (to have them ready while the gates train). ``--readouts
final,on-target`` also screens the near-ties of the gates read where exactly the target was closed
(``GateConfig.readout``), recomputed from the recorded trajectory, so both readouts are judged on the same screen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.loading import load_model
from foldgpt.selection.candidates import baseline_sets, candidate_sets, heldout_windows, merged_proposals, screen_sets
from foldgpt.selection.config import PRUNE_SCREEN, default_calibration
from foldgpt.selection.gates import closed_count_direction, ensemble_gates
from foldgpt.surgery.removal import blocks_removed_temporarily


def test_perplexities(loaded, removed: list[int], seqlens: list[int], max_tokens: int) -> dict:
    """WikiText-2 and PTB test perplexity of ``loaded`` without ``removed``, at each window length."""
    results = {}
    with blocks_removed_temporarily(loaded.model, removed) as model:
        for seqlen in seqlens:
            for name in ("wikitext2", "ptb"):
                results[f"{name}@{seqlen}"] = perplexity(model, loaded.tokenizer, name, seqlen, max_tokens).perplexity
    return results


def readout_scores(record: dict, remove: int, readout: str) -> list[float]:
    """The gates ``readout`` removes by, from a ``prune --method gates`` record's trajectory (its on-target flags
    recomputed when the record predates them: unit costs, the record's ``closed_below``)."""
    if readout == "final":
        return record["scores"]
    details = record["details"]
    history, restarts = details["gate_history"], details.get("restarts", 1)
    closed_below = details["hyperparameters"]["closed_below"]
    flags = details.get("on_target_history") or [
        closed_count_direction(torch.tensor(gates), remove, closed_below) == 0 for gates in history]
    steps = len(history) // restarts
    runs = [history[k * steps:(k + 1) * steps] for k in range(restarts)]
    run_flags = [flags[k * steps:(k + 1) * steps] for k in range(restarts)]
    return ensemble_gates(runs, run_flags, readout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--remove", type=int, required=True)
    parser.add_argument("--gates", help="foldgpt.json of 'prune --method gates --gate-probe-screen 0' (its scores)")
    parser.add_argument("--seqlens", default="1024,512")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--readouts", default="final", help="comma-separated gate readouts whose near-ties are screened")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model's test perplexity")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = load_model(args.model)
    calibration: CalibrationConfig = default_calibration("gates")
    windows = load_windows(loaded.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    config = PRUNE_SCREEN
    baselines = baseline_sets(loaded.model, windows, args.remove, config.baselines)
    readouts = args.readouts.split(",") if args.gates else []
    record = json.loads(Path(args.gates).read_text()) if args.gates else {}
    scores = {readout: readout_scores(record, args.remove, readout) for readout in readouts}
    ties = {readout: candidate_sets(scores[readout], args.remove, config.screen, config.pool) for readout in readouts}
    origins = {readout: "gates" if readout == "final" else f"gates {readout}" for readout in readouts}
    merged = merged_proposals({**{origins[readout]: ties[readout] for readout in readouts},
                               **{name: [removed] for name, removed in baselines.items()}})
    held_out = heldout_windows(loaded, config, calibration)
    screen_windows = held_out[: config.screen_tokens // held_out.shape[1]]
    screened = screen_sets(loaded, [removed for removed, _ in merged], screen_windows, [origins for _, origins in merged])
    for record in screened:
        print(f"{record['removed']} {'+'.join(record['origin'])}: held-out {record['ppl_before']:.2f}", flush=True)
    picks: dict[str, list[int]] = dict(baselines)
    for readout in readouts:
        label = "" if readout == "final" else f", {readout} readout"
        picks[f"gates (own pick{label})"] = ties[readout][0]
        with_baselines = [entry for entry in screened if origins[readout] in entry["origin"]
                          or set(entry["origin"]) & set(baselines)]
        picks[f"gates + screen with baselines (0.2{label})"] = min(with_baselines, key=lambda entry: entry["ppl_before"])["removed"]
    seqlens = [int(s) for s in args.seqlens.split(",")]
    tests = {}
    for name, removed in picks.items():
        key = ",".join(map(str, removed))
        if key not in tests:
            tests[key] = test_perplexities(loaded, removed, seqlens, args.max_tokens)
        print(f"{name}: {removed} test {tests[key]}", flush=True)
    dense = None if args.no_dense else test_perplexities(loaded, [], seqlens, args.max_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "remove": args.remove, "gates": args.gates, "calibration": vars(calibration),
        "screen": {"windows": len(screen_windows), "seqlen": int(held_out.shape[1])}, "baselines": baselines, "readout_scores": scores,
        "screened": screened, "picks": picks, "test": tests, "dense": dense, "max_tokens": args.max_tokens,
        "seconds": time.perf_counter() - start}, indent=2) + "\n")


if __name__ == "__main__":
    main()
