"""SLEB (Song et al., 2024): greedily remove, one at a time, the block whose removal raises calibration
perplexity least, re-scoring all remaining blocks after each removal (so coupled blocks are handled)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from foldgpt.arch.adapters import adapter_for
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.selection.base import Selection
from foldgpt.surgery.removal import blocks_removed_temporarily


def select_by_sleb(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
    """Greedy search; ``details['steps']`` records each step's chosen block and resulting calibration perplexity."""
    num_blocks = len(adapter_for(model).layers(model))
    removed: list[int] = []
    steps = []
    candidates_total = sum(num_blocks - k for k in range(n_remove))
    with tqdm(total=candidates_total, desc="sleb", leave=False) as progress:
        for _ in range(n_remove):
            scores: dict[int, float] = {}
            for candidate in (i for i in range(num_blocks) if i not in removed):
                with blocks_removed_temporarily(model, [*removed, candidate]):
                    scores[candidate] = windows_perplexity(model, windows, progress=False)
                progress.update(1)
            best = min(scores, key=scores.__getitem__)
            removed.append(best)
            steps.append({"removed": best, "calibration_perplexity": scores[best]})
    return Selection(method="sleb", removed=sorted(removed), details={"order": removed, "steps": steps})
