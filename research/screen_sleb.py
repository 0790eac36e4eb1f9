"""Would SLEB's sets, screened beside the others, close the default's misses on Gemma-3 at windows of 512? Validation only.

    OMP_NUM_THREADS=1 python research/screen_sleb.py gemma3-270m research/results/screen_sleb_gemma3-270m.json \
        9,14,15,17 6,7,12,16 8,9,13,14,15,17 2,6,7,12,14,16

On Gemma-3-270M's test split SLEB's sets (``selection_test_gemma3-270m_sleb.json``) are lower than the default's at
4 and 6 blocks with windows of 512, and higher with windows of 1,024. ``--gate-probe-baselines bi,angular,sleb`` would
put them among the screened candidates. This script scores each given set on the screen's own held-out tokens (the
WikiText-2 validation windows that skip every calibration window, as ``prune --method gates`` screens them) in
windows of 1,024 and of 512, and on text neither saw: the next ``--judge-tokens`` of those windows and the first
``--judge-tokens`` of PTB validation, at both lengths. If SLEB's set is higher on the screen at 1,024, adding it to
the screen changes nothing; if validation at 512 ranks the sets as the test split does, the miss is the window
length's, not the selection's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import load_model
from foldgpt.selection.candidates import heldout_windows
from foldgpt.selection.config import PRUNE_SCREEN, default_calibration
from foldgpt.surgery.removal import blocks_removed_temporarily


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("sets", nargs="+", help="comma-separated blocks to remove, one argument per set")
    parser.add_argument("--judge-tokens", type=int, default=8192)
    args = parser.parse_args()
    loaded = load_model(args.model)
    held_out = heldout_windows(loaded, PRUNE_SCREEN, default_calibration("gates"))
    screen = held_out[: PRUNE_SCREEN.screen_tokens // held_out.shape[1]]
    after = held_out[len(screen): len(screen) + args.judge_tokens // held_out.shape[1]]
    ptb = tokenize(loaded.tokenizer, load_text("ptb", "calibration"))
    texts = {"screen@1024": screen, "screen@512": screen.reshape(-1, 512),
             "wikitext2-val@1024": after, "wikitext2-val@512": after.reshape(-1, 512),
             "ptb-val@1024": evaluation_windows(ptb, 1024, args.judge_tokens),
             "ptb-val@512": evaluation_windows(ptb, 512, args.judge_tokens)}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for text in args.sets:
        if text in results:
            continue
        start = time.perf_counter()
        with blocks_removed_temporarily(loaded.model, [int(b) for b in text.split(",")]) as model:
            results[text] = {name: windows_perplexity(model, windows, progress=False) for name, windows in texts.items()}
        results[text]["seconds"] = time.perf_counter() - start
        print(text, json.dumps(results[text]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
