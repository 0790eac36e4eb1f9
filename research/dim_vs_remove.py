"""Why soft gates can pick blocks whose removal is ruinous: per block, the damage of *dimming* it (its residual update
scaled by 0.5, what a half-open gate does) against the damage of *removing* it, on held-out validation text.

    python research/dim_vs_remove.py MODEL --windows 4 --seqlen 256 --out research/results/dim_vs_remove_MODEL.json

Both are measured as the mean next-token KL(dense || modified) and as perplexity on the windows; a block with a low
dimming cost but a high removal cost is one that gates rank as cheap and the removal wrecks.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.formats.loading import load_model
from foldgpt.selection.gates import gated
from foldgpt.surgery.removal import blocks_removed_temporarily
from foldgpt.train.losses import distillation_loss, next_token_loss


@torch.no_grad()
def scores(model, windows: torch.Tensor, reference: list[torch.Tensor]) -> tuple[float, float]:
    """(mean KL to the dense logits, perplexity) of ``model`` on ``windows``."""
    kl, nll = 0.0, 0.0
    for ids, dense_logits in zip(windows, reference):
        logits = model(input_ids=ids[None], use_cache=False).logits
        kl += distillation_loss(logits, dense_logits, 1.0).item()
        nll += next_token_loss(logits, ids[None]).item()
    return kl / len(windows), math.exp(nll / len(windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--dim", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model = loaded.model
    tokens = tokenize(loaded.tokenizer, load_text("wikitext2", "calibration"))
    windows = evaluation_windows(tokens[-args.windows * args.seqlen :], args.seqlen)  # the split's tail
    with torch.no_grad():
        reference = [model(input_ids=ids[None], use_cache=False).logits for ids in windows]
    num_blocks = model.config.num_hidden_layers
    rows = []
    for block in range(num_blocks):
        with gated(model) as gates, torch.no_grad():
            gates.values[block] = args.dim
            dim_kl, dim_ppl = scores(model, windows, reference)
        with blocks_removed_temporarily(model, [block]):
            rm_kl, rm_ppl = scores(model, windows, reference)
        rows.append({"block": block, "dim_kl": dim_kl, "dim_ppl": dim_ppl, "remove_kl": rm_kl, "remove_ppl": rm_ppl,
                     "ratio": rm_kl / max(dim_kl, 1e-12)})
        print(f"block {block:2d}: dim {args.dim} KL {dim_kl:.4f} ppl {dim_ppl:9.2f} | remove KL {rm_kl:.4f} ppl {rm_ppl:9.2f}"
              f" | ratio {rows[-1]['ratio']:.1f}", flush=True)
    dense_ppl = scores(model, windows, reference)[1]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "dense_ppl": dense_ppl, "windows": args.windows,
                                          "seqlen": args.seqlen, "dim": args.dim, "blocks": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
