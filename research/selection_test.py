"""Test-split perplexity of given removal sets (first 16,384 tokens of WikiText-2 and PTB test, windows of 1,024 and
512), the blocks taken out in place: the last column of docs/results/gate-selection.md.

    OMP_NUM_THREADS=2 python research/selection_test.py gemma3-270m research/results/selection_test_gemma3-270m_r4.json \
        9,14,15,17 13,15,16,17
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.loading import load_model
from foldgpt.surgery.removal import blocks_removed_temporarily


def main() -> None:
    model_spec, out, *sets = sys.argv[1:]
    loaded = load_model(model_spec)
    results: dict[str, dict[str, float]] = {}
    for text in sets:
        removed = [int(block) for block in text.split(",")]
        with blocks_removed_temporarily(loaded.model, removed) as model:
            for seqlen in (1024, 512):
                for name in ("wikitext2", "ptb"):
                    value = perplexity(model, loaded.tokenizer, name, seqlen, 16384).perplexity
                    results.setdefault(text, {})[f"{name}@{seqlen}"] = value
                    print(removed, name, seqlen, value, flush=True)
                    Path(out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
