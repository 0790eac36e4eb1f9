"""The gates' own objective for given removal sets: does a set the gates did not pick fit the calibration text better?

    OMP_NUM_THREADS=1 python research/set_objective.py --sets '[[4,5,14,26],[13,14,17,25]]'

For every set: remove those blocks from the dense model and measure, on the calibration windows the gates train on
(WikiText-2 validation, ``--nsamples`` x 256 tokens drawn with ``--seed``, the prune default), the mean KL(dense ||
pruned) over tokens (the gates' loss, without the regulariser) and the mean LM loss. If another set has a lower KL
than the gates' pick, the gate training did not reach its objective's minimum; whether that minimum is also better
on held-out text is then read off ``gate_stability.py``'s validation perplexity for the same sets. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from foldgpt.data.windows import load_windows
from foldgpt.formats.loading import load_model
from foldgpt.surgery.removal import remove_blocks


@torch.no_grad()
def log_probs(model: torch.nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities for each window, one ``[seqlen, vocab]`` tensor per window."""
    return [F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0].float(), dim=-1) for w in windows]


@torch.no_grad()
def objective(model: torch.nn.Module, windows: torch.Tensor, teacher: list[torch.Tensor]) -> dict[str, float]:
    """Mean over windows of the token-mean KL(teacher || model) and of the LM loss."""
    kl = lm = 0.0
    for window, target in zip(windows, teacher):
        student = F.log_softmax(model(input_ids=window[None], use_cache=False).logits[0].float(), dim=-1)
        kl += (target.exp() * (target - student)).sum(-1).mean().item()
        lm += F.nll_loss(student[:-1], window[1:]).item()
    return {"kl": kl / len(windows), "lm": lm / len(windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sets", required=True, help="removal sets as JSON, e.g. '[[4,5,14,26],[13,14,17,25]]'")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows of 256 tokens (prune's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="research/results/set_objective.json")
    args = parser.parse_args()
    loaded = load_model(args.model)
    windows = load_windows(loaded.tokenizer, "wikitext2", args.nsamples, 256, args.seed)
    teacher = log_probs(loaded.model, windows)
    rows = []
    print("| removed | KL(dense || pruned) | LM loss |\n|---|---|---|")
    for removed in json.loads(args.sets):
        row = {"removed": sorted(removed), **objective(remove_blocks(copy.deepcopy(loaded.model), removed), windows, teacher)}
        rows.append(row)
        print(f"| {' '.join(map(str, row['removed']))} | {row['kl']:.4f} | {row['lm']:.4f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "nsamples": args.nsamples, "seqlen": 256, "seed": args.seed,
                               "calibration": "wikitext2 validation", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
