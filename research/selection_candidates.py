"""Replay the gate selection's screen on recorded gate scores: the gates' near-ties and the baselines' sets (bi,
angular), each scored with its blocks really removed on held-out WikiText-2 validation windows that skip the
calibration windows (what ``prune --method gates`` does by default since 0.2.0), then the test-split perplexity of the
sets that matter (the gates' own pick, the old screen's pick, the new pick, bi, angular).

    python research/selection_candidates.py MODEL --remove 4 --gates runs/gemma-g4/foldgpt.json \
        --out research/results/selection_candidates_gemma3-270m_r4.json

Without ``--gates`` only the baselines are scored (to have them ready while the gates train).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.loading import load_model
from foldgpt.selection.candidates import baseline_sets, candidate_sets, heldout_windows, merged_candidates, screen_sets
from foldgpt.selection.config import PRUNE_SCREEN, default_calibration
from foldgpt.surgery.removal import blocks_removed_temporarily


def test_perplexities(loaded, removed: list[int], seqlens: list[int], max_tokens: int) -> dict:
    """WikiText-2 and PTB test perplexity of ``loaded`` without ``removed``, at each window length."""
    results = {}
    with blocks_removed_temporarily(loaded.model, removed) as model:
        for seqlen in seqlens:
            for name in ("wikitext2", "ptb"):
                results[f"{name}@{seqlen}"] = perplexity(model, loaded.tokenizer, name, seqlen, max_tokens).perplexity
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--remove", type=int, required=True)
    parser.add_argument("--gates", help="foldgpt.json of 'prune --method gates --gate-probe-screen 0' (its scores)")
    parser.add_argument("--seqlens", default="1024,512")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = load_model(args.model)
    calibration: CalibrationConfig = default_calibration("gates")
    windows = load_windows(loaded.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    config = PRUNE_SCREEN
    baselines = baseline_sets(loaded.model, windows, args.remove, config.baselines)
    near_ties: list[list[int]] = []
    if args.gates:
        scores = json.loads(Path(args.gates).read_text())["scores"]
        near_ties = candidate_sets(scores, args.remove, config.screen, config.pool)
    merged = merged_candidates(near_ties, baselines)
    held_out = heldout_windows(loaded, config, calibration)
    screen_windows = held_out[: config.screen_tokens // held_out.shape[1]]
    screened = screen_sets(loaded, [removed for removed, _ in merged], screen_windows, [origins for _, origins in merged])
    for record in screened:
        print(f"{record['removed']} {'+'.join(record['origin'])}: held-out {record['ppl_before']:.2f}", flush=True)
    picks: dict[str, list[int]] = dict(baselines)
    if near_ties:
        picks["gates (own pick)"] = near_ties[0]
        old = [record for record in screened if "gates" in record["origin"]]
        picks["gates + screen of near-ties (0.1)"] = min(old, key=lambda record: record["ppl_before"])["removed"]
        picks["gates + screen with baselines (0.2)"] = min(screened, key=lambda record: record["ppl_before"])["removed"]
    seqlens = [int(s) for s in args.seqlens.split(",")]
    tests = {}
    for name, removed in picks.items():
        key = ",".join(map(str, removed))
        if key not in tests:
            tests[key] = test_perplexities(loaded, removed, seqlens, args.max_tokens)
        print(f"{name}: {removed} test {tests[key]}", flush=True)
    dense = test_perplexities(loaded, [], seqlens, args.max_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "remove": args.remove, "gates": args.gates, "calibration": vars(calibration),
        "screen": {"windows": len(screen_windows), "seqlen": int(held_out.shape[1])}, "baselines": baselines,
        "screened": screened, "picks": picks, "test": tests, "dense": dense, "max_tokens": args.max_tokens,
        "seconds": time.perf_counter() - start}, indent=2) + "\n")


if __name__ == "__main__":
    main()
