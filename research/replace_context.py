"""Does a map fitted on 256-token windows hold at positions 256-1,023? Angular's 8-block span (11-18) of SmolLM2-135M
got worse with ``--replace linear`` on the 1,024-token test windows (307.6 against 272.5) although held-out
validation in 256-token windows had it far better (178.9 against 408.3). Here the same set on WikiText-2
*validation* (no test split): plain, and maps fitted on 64 x 256 or 16 x 1,024 windows (the same 16,384 tokens), each
scored in held-out windows of 256 and of 1,024 tokens. bi's 8-block set (four short spans) as the control.

    OMP_NUM_THREADS=1 python research/replace_context.py research/results/replace_context.json
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
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import blocks_removed_temporarily, remove_blocks
from foldgpt.workflows.replace import replace_removed

SETS = {"angular": [11, 12, 13, 14, 15, 16, 17, 18], "bi": [3, 12, 13, 14, 15, 17, 25, 26]}
FITS = ((64, 256), (16, 1024))
HELD_OUT = 8192


def main() -> None:
    out = Path(sys.argv[1])
    loaded = load_model("smollm2-135m")
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "calibration"))
    avoid = [(s, s + seqlen) for windows, seqlen in FITS for s in calibration_starts(len(ids), windows, seqlen, 0)]
    held_out = {seqlen: windows_avoiding(ids, seqlen, HELD_OUT, avoid) for seqlen in (256, 1024)}
    rows = []
    for method, removed in SETS.items():
        with blocks_removed_temporarily(loaded.model, removed) as model:
            scores = {str(s): windows_perplexity(model, w, progress=False) for s, w in held_out.items()}
        rows.append({"method": method, "fit": None, "held_out_ppl": scores})
        print(rows[-1], flush=True)
        for windows, seqlen in FITS:
            model = copy.deepcopy(loaded.model)
            config = ReplacementConfig("linear", nsamples=windows)
            replace_removed(ResidentBlocks(model), calibration_windows(ids, windows, seqlen, 0), removed, config)
            remove_blocks(model, removed)
            scores = {str(s): windows_perplexity(model, w, progress=False) for s, w in held_out.items()}
            rows.append({"method": method, "fit": [windows, seqlen], "held_out_ppl": scores})
            print(rows[-1], flush=True)
            out.write_text(json.dumps({"held_out_tokens": HELD_OUT, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
