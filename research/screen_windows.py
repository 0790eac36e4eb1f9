"""Should the screen also judge windows of half its length? Rules compared on validation text only.

    OMP_NUM_THREADS=1 python research/screen_windows.py smollm2-135m --remove 4 \
        --record research/results/selection_candidates_smollm2-135m_r4.json \
        --out research/results/screen_windows_smollm2-135m_r4.json

The record is a ``research/selection_candidates.py`` result: its ``screened`` candidates (the gates' near-ties and
bi's and angular's sets, final readout only, as ``prune --method gates`` screens them) with their perplexity on the
screen's held-out tokens in windows of 1,024. This script scores the same tokens again in windows of 512 and
compares three rules for the pick: ``1024`` (today), ``512``, and ``both`` (the lowest mean log perplexity over the
two window lengths). Each rule's pick and bi's and angular's sets are then judged on text neither the screen nor the
gates saw: the next ``--judge-tokens`` of the screen's held-out WikiText-2 validation windows (they skip every
calibration window) and the first ``--judge-tokens`` of PTB validation, in windows of 1,024 and 512. No test split
is read.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import load_model
from foldgpt.selection.candidates import heldout_windows, screen_sets
from foldgpt.selection.config import PRUNE_SCREEN, default_calibration
from foldgpt.surgery.removal import blocks_removed_temporarily


def baseline_picks(record: dict) -> dict[str, list[int]]:
    """bi's and angular's sets from a selection_candidates record (either of its two layouts)."""
    picks = {}
    for name in ("bi", "angular"):
        value = record["picks"][name]
        picks[name] = value["removed"] if isinstance(value, dict) else value
    return picks


def rule_picks(screened: list[dict]) -> dict[str, list[int]]:
    """Each rule's lowest candidate."""
    def score(entry: dict, rule: str) -> float:
        if rule == "1024":
            return entry["ppl_before"]
        if rule == "512":
            return entry["ppl_512"]
        return (math.log(entry["ppl_before"]) + math.log(entry["ppl_512"])) / 2
    return {rule: min(screened, key=lambda entry: score(entry, rule))["removed"] for rule in ("1024", "512", "both")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--remove", type=int, required=True)
    parser.add_argument("--record", required=True, help="a research/selection_candidates.py result")
    parser.add_argument("--judge-tokens", type=int, default=16384)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    record = json.loads(Path(args.record).read_text())
    loaded = load_model(args.model)
    config = PRUNE_SCREEN
    held_out = heldout_windows(loaded, config, default_calibration("gates"))
    screen = held_out[: config.screen_tokens // held_out.shape[1]]
    short = screen.reshape(-1, 512)
    screened = [entry for entry in record["screened"] if set(entry["origin"]) - {"gates on-target"}]
    for entry, short_record in zip(screened, screen_sets(loaded, [entry["removed"] for entry in screened], short)):
        entry["ppl_512"] = short_record["ppl_before"]
        print(f"{entry['removed']} {'+'.join(entry['origin'])}: 1024 {entry['ppl_before']:.2f} 512 {entry['ppl_512']:.2f}",
              flush=True)
    picks = {**baseline_picks(record), **rule_picks(screened)}
    after = held_out[len(screen): len(screen) + args.judge_tokens // held_out.shape[1]]
    ptb = tokenize(loaded.tokenizer, load_text("ptb", "calibration"))
    judges = {"wikitext2-val@1024": after, "wikitext2-val@512": after.reshape(-1, 512),
              "ptb-val@1024": evaluation_windows(ptb, 1024, args.judge_tokens),
              "ptb-val@512": evaluation_windows(ptb, 512, args.judge_tokens)}
    judged: dict[str, dict] = {}
    for label, removed in picks.items():
        key = ",".join(map(str, removed))
        if key not in judged:
            with blocks_removed_temporarily(loaded.model, removed) as student:
                judged[key] = {name: windows_perplexity(student, windows, progress=False) for name, windows in judges.items()}
        print(f"{label}: {removed} validation {judged[key]}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "remove": args.remove, "record": args.record, "screened": screened, "picks": picks,
        "validation": judged, "judge_tokens": args.judge_tokens, "seconds": time.perf_counter() - start}, indent=2) + "\n")


if __name__ == "__main__":
    main()
