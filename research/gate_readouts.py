"""Other ways to read a removal set off trained gates, judged by the KL of the *hard* removal on the calibration windows.

    OMP_NUM_THREADS=1 python research/gate_readouts.py --rule swap --seeds 0,1
    OMP_NUM_THREADS=1 python research/gate_readouts.py --rule visited --seeds 0,1

Both start from the gate trajectories that ``research/gate_stability.py`` saved (``--trajectories``; the same seed
draws the same calibration windows: wikitext2 validation, 8 x 256 tokens) and score KL(dense || pruned model) with
the blocks really removed, not gated:

- ``swap``: start from the smallest final gates and, while it lowers that KL, make the best swap of a removed block
  with one of the next ``--pool`` smallest gates (a local search seeded by the gates);
- ``visited``: of the removal sets the smallest gates formed during the last ``--frac`` of the steps, take the one
  with the lowest KL.

The chosen set and the starting one are scored on WikiText-2 / PTB *validation* text (first ``--max-tokens`` tokens,
windows of 1024), as in ``gate_stability.py``. Prints one JSON line per seed and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gate_stability import smallest
from transformers import PreTrainedModel

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, load_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import load_model
from foldgpt.surgery.removal import blocks_removed_temporarily
from foldgpt.train.losses import distillation_loss


class HardRemovalKL:
    """Mean per-token KL(dense || model without ``removed``) on fixed windows (gate training's ``distillation_loss``);
    the dense logits are computed once."""

    def __init__(self, model: PreTrainedModel, windows: torch.Tensor) -> None:
        self.model, self.windows, self.scores = model, windows, {}
        self.teacher = [self._logits(ids) for ids in windows]

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=ids[None], use_cache=False).logits.float()

    def __call__(self, removed: tuple[int, ...]) -> float:
        if removed not in self.scores:
            with blocks_removed_temporarily(self.model, list(removed)):
                kls = [distillation_loss(self._logits(ids), teacher, 1.0).item() for ids, teacher in zip(self.windows, self.teacher)]
            self.scores[removed] = sum(kls) / len(kls)
        return self.scores[removed]


def swap_search(kl: HardRemovalKL, gates: list[float], n_remove: int, pool: int) -> tuple[int, ...]:
    order = sorted(range(len(gates)), key=lambda i: (gates[i], i))
    current, candidates = tuple(smallest(gates, n_remove)), order[: n_remove + pool]
    while True:
        swaps = [tuple(sorted({*current} - {out} | {into})) for out in current for into in candidates if into not in current]
        best = min(swaps, key=kl)
        if kl(best) >= kl(current):
            return current
        current = best


def visited_pick(kl: HardRemovalKL, history: list[list[float]], n_remove: int, frac: float) -> tuple[int, ...]:
    visited = {tuple(smallest(gates, n_remove)) for gates in history[int(len(history) * (1 - frac)):]}
    return min(sorted(visited), key=kl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rule", choices=("swap", "visited"), required=True)
    parser.add_argument("--trajectories", default="research/results/gate_stability.json")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--pool", type=int, default=4, help="swap: candidates beyond the removed blocks")
    parser.add_argument("--frac", type=float, default=0.5, help="visited: the last fraction of the steps")
    parser.add_argument("--max-tokens", type=int, default=8192, help="validation tokens per set")
    parser.add_argument("--out", default="research/results/gate_readouts.json")
    args = parser.parse_args()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    held_out = {name: evaluation_windows(tokenize(loaded.tokenizer, load_text(name, "calibration")), 1024, args.max_tokens)
                for name in ("wikitext2", "ptb")}
    rows = [row for row in json.loads(Path(args.trajectories).read_text()) if row["rule"] == "trajectory"]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else []
    for seed in (int(s) for s in args.seeds.split(",")):
        history = next(row["gate_history"] for row in rows if row["seed"] == seed)
        kl = HardRemovalKL(model, load_windows(loaded.tokenizer, "wikitext2", 8, 256, seed))
        start = tuple(smallest(history[-1], args.remove))
        chosen = (swap_search(kl, history[-1], args.remove, args.pool) if args.rule == "swap"
                  else visited_pick(kl, history, args.remove, args.frac))
        for name, removed in (("final gates", start), (args.rule, chosen)):
            with torch.no_grad(), blocks_removed_temporarily(model, list(removed)):
                ppl = {data: windows_perplexity(model, windows, progress=False) for data, windows in held_out.items()}
            row = {"seed": seed, "rule": name, "removed": list(removed), "calibration_kl": kl(removed),
                   "sets_scored": len(kl.scores), "validation_perplexity": ppl}
            print(json.dumps(row), flush=True)
            results.append(row)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
