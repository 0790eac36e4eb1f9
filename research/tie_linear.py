"""Do fitted ties pay on top of linear replacement? (issue 22)

At -25% parameters, ``--replace linear`` (ReplaceMe's maps) healed to the lowest perplexity of every variant, and the
fitted ties healed level with plain removal (docs/results/fold-vs-remove.md). Fitted on the plan's own stream, a tie
also learns to stand in for the removed blocks before it; with the maps in place that job is smaller. This script
builds ``--fold auto``'s two candidates with the maps in both (Block Influence's removal at ``--target`` with its maps,
against one block fewer with its maps plus the fewest rank-64 ties at the same unique parameters, the ties fitted on
that model's own stream), heals each with ``HealConfig()`` (seed 0) and scores both before and after on WikiText-2
validation windows of 1,024 that no tie-fitting or map-fitting window overlaps (validation text, for choosing).

    OMP_NUM_THREADS=1 python research/tie_linear.py smollm2-135m --target 0.75 --out research/results/tie_linear.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from foldgpt.analysis.redundancy import redundancy_stats
from foldgpt.data.config import CalibrationConfig
from foldgpt.data.text import load_text
from foldgpt.data.windows import calibration_starts, calibration_windows, tokenize, windows_avoiding
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.healing.config import HealConfig
from foldgpt.healing.save import save_healed
from foldgpt.surgery.config import ReplacementConfig, TieConfig
from foldgpt.surgery.removal import count_parameters
from foldgpt.workflows.fold import tie_model
from foldgpt.workflows.fold_plan import healed_perplexity, tie_plan_for_budget
from foldgpt.workflows.prune import prune


def held_out_windows(dense: LoadedModel, ties: TieConfig, maps: ReplacementConfig):
    """The tie-fitting windows, and 8 x 1,024 validation tokens that neither those nor the maps' windows overlap."""
    tokens = tokenize(dense.tokenizer, load_text(ties.data, "calibration"))
    fit = calibration_windows(tokens, ties.fit_windows, ties.fit_seqlen, ties.seed)
    spans = [(s, s + ties.fit_seqlen) for s in calibration_starts(len(tokens), ties.fit_windows, ties.fit_seqlen, ties.seed)]
    seed = CalibrationConfig().seed
    spans += [(s, s + maps.seqlen) for s in calibration_starts(len(tokens), maps.nsamples, maps.seqlen, seed)]
    return fit, windows_avoiding(tokens, ties.check_seqlen, ties.check_tokens, spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    maps, ties_config = ReplacementConfig("linear"), TieConfig()
    dense = load_model(args.model)
    fit, held_out = held_out_windows(dense, ties_config, maps)
    removal = prune(load_model(args.model), "bi", target_params=args.target, replacement=maps)
    removed = removal.metadata["removed"]
    influence = redundancy_stats(dense.model, fit).block_influence
    plan = tie_plan_for_budget(dense.model, removed, influence, ties_config.rank, count_parameters(removal.loaded.model))
    assert plan is not None, "no tie candidate at this target"
    fewer, ties = plan
    fewer_maps = prune(load_model(args.model), "given", blocks=fewer, replacement=maps)
    spec = ",".join(f"{parent}:{child}" for parent, child in ties)
    tied = tie_model(fewer_maps.loaded, dense, replace(ties_config, ties=spec), removed=fewer)
    record: dict = {"model": args.model, "target": args.target, "held_out_tokens": int(held_out.numel()), "candidates": []}
    with tempfile.TemporaryDirectory(prefix="tie-linear-") as scratch:
        tied.loaded = save_healed(tied.loaded, Path(scratch) / "ties", tied.metadata)
        for name, candidate, meta, blocks in (("remove+linear", removal.loaded, removal.metadata, removed),
                                               ("ties+linear", tied.loaded, fewer_maps.metadata, fewer)):
            row = {"name": name, "removed": blocks, "ties": [list(t) for t in ties] if name == "ties+linear" else [],
                   "unique_parameters": tied.report.unique if name == "ties+linear" else count_parameters(candidate.model),
                   "maps_kept": meta.get("replacement", {}).get("check", {}).get("kept"),
                   "perplexity": windows_perplexity(candidate.model, held_out, progress=False),
                   "perplexity_healed": healed_perplexity(candidate, dense, held_out, HealConfig())}
            record["candidates"].append(row)
            print(json.dumps(row), flush=True)
    record["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
