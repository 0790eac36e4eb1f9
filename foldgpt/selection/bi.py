"""ShortGPT (Men et al., 2024): remove the blocks with the lowest Block Influence, 1 - cos(input, output)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from foldgpt.analysis.redundancy import RedundancyStats, redundancy_stats
from foldgpt.selection.base import Selection


def select_by_block_influence(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
    """The ``n_remove`` blocks that change their input least (one calibration pass)."""
    return selection_from_stats(redundancy_stats(model, windows), n_remove)


def selection_from_stats(stats: RedundancyStats, n_remove: int) -> Selection:
    """The ``n_remove`` blocks of lowest Block Influence in ``stats`` (in-memory or block-by-block statistics)."""
    ranking = sorted(range(stats.num_blocks), key=lambda i: stats.block_influence[i])
    return Selection(method="bi", removed=sorted(ranking[:n_remove]), scores=stats.block_influence)
