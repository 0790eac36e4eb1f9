"""Gromov et al. (2024), "The Unreasonable Ineffectiveness of the Deeper Layers": remove the contiguous span of
``n`` blocks whose input and output residual states (last token) have the smallest angular distance."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from foldgpt.analysis.redundancy import RedundancyStats, redundancy_stats
from foldgpt.selection.base import Selection


def select_by_angular_distance(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
    """The best span ``l .. l+n-1``; scores are the distance of every possible start ``l``."""
    return selection_from_stats(redundancy_stats(model, windows), n_remove)


def selection_from_stats(stats: RedundancyStats, n_remove: int) -> Selection:
    """The best span of ``n_remove`` blocks by the angular distances in ``stats`` (in-memory or block-by-block)."""
    start = stats.best_angular_span(n_remove)
    span_distances = [stats.angular_distance[s][s + n_remove] for s in range(stats.num_blocks - n_remove + 1)]
    return Selection(
        method="angular",
        removed=list(range(start, start + n_remove)),
        scores=span_distances,
        details={"span_start": start, "scores_are": "angular distance of the span starting at each block"},
    )
