"""Choosing ``--replace-ridge`` and the number of calibration windows of ``--replace linear`` on validation text.

SmolLM2-135M, bi and angular sets of 8 blocks (chosen on the default 16 x 256 WikiText-2 validation windows), each
replaced with maps fitted on N windows of 256 tokens (seed 0) at several ridges; scored on WikiText-2 validation
windows that none of the calibration windows overlap (the first 32 x 256 free tokens). No test split is read.

    OMP_NUM_THREADS=1 python research/replace_ridge.py research/results/replace_ridge.json
    OMP_NUM_THREADS=1 python research/replace_ridge.py research/results/replace_cosine.json cosine

The second run refines the ridge-1e-4 map on 16 windows by the cosine objective, at several Adam settings.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from foldgpt.data.text import load_text
from foldgpt.data.windows import calibration_starts, calibration_windows, tokenize, windows_avoiding
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.formats.loading import load_model
from foldgpt.selection.registry import select_blocks
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import blocks_removed_temporarily, remove_blocks
from foldgpt.workflows.replace import replace_removed

SEQLEN = 256
WINDOWS = (16, 64)
RIDGES = (0.0, 1e-6, 1e-4, 1e-2, 1e-1)
COSINE = ((100, 1e-4), (300, 1e-4), (100, 1e-3), (300, 1e-3))


def configs(study: str) -> list[tuple[int, ReplacementConfig]]:
    """(windows, config) pairs of a study: the ridges at each window count, or the cosine refinements."""
    if study == "cosine":
        return [(16, ReplacementConfig("linear", nsamples=16, ridge=1e-4, objective="cosine", cosine_steps=steps,
                                       cosine_lr=lr)) for steps, lr in COSINE]
    return [(windows, ReplacementConfig("linear", nsamples=windows, ridge=ridge)) for windows in WINDOWS for ridge in RIDGES]


def main() -> None:
    out = Path(sys.argv[1])
    study = sys.argv[2] if len(sys.argv) > 2 else "ridge"
    loaded = load_model("smollm2-135m")
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "calibration"))
    avoid = [(start, start + SEQLEN) for start in calibration_starts(len(ids), max(WINDOWS), SEQLEN, 0)]
    held_out = windows_avoiding(ids, SEQLEN, 32 * SEQLEN, avoid)
    selection_windows = calibration_windows(ids, 16, SEQLEN, 0)
    results: dict = {"held_out_tokens": held_out.numel(), "rows": []}
    for method in ("bi", "angular"):
        removed = select_blocks(method, loaded.model, selection_windows, 8, 0).removed
        with blocks_removed_temporarily(loaded.model, removed) as model:
            plain = windows_perplexity(model, held_out, batch_size=4, progress=False)
        results["rows"].append({"method": method, "removed": removed, "replace": "none", "held_out_ppl": plain})
        print(method, removed, "none", plain, flush=True)
        for windows, config in configs(study):
            calibration = calibration_windows(ids, windows, SEQLEN, 0)
            model = copy.deepcopy(loaded.model)
            report, _ = replace_removed(ResidentBlocks(model), calibration, removed, config)
            remove_blocks(model, removed)
            value = windows_perplexity(model, held_out, batch_size=4, progress=False)
            results["rows"].append({"method": method, "removed": removed, "replace": "linear", "windows": windows,
                                    "config": vars(config), "held_out_ppl": value, "spans": report["spans"]})
            print(method, windows, vars(config), value, [round(s["cosine_distance"], 5) for s in report["spans"]], flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            del model


if __name__ == "__main__":
    main()
