"""Every block-selection method by its ``--method`` name.

Each method has the signature ``method(model, calibration_windows, n_remove, seed) -> Selection`` (``base``); this
table is the one place that names them, so the CLI's choices and ``prune`` read the same list.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from foldgpt.errors import FoldGPTError
from foldgpt.selection.angular import select_by_angular_distance
from foldgpt.selection.base import Selection, SelectionMethod, select_blocks_with
from foldgpt.selection.baselines import select_last, select_random
from foldgpt.selection.bi import select_by_block_influence
from foldgpt.selection.gates import select_by_gates
from foldgpt.selection.sleb import select_by_sleb

METHODS: dict[str, SelectionMethod] = {
    "gates": select_by_gates,
    "bi": select_by_block_influence,
    "angular": select_by_angular_distance,
    "sleb": select_by_sleb,
    "last": select_last,
    "random": select_random,
}


def select_blocks(method: str, model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int = 0) -> Selection:
    """Run one method by name, timing it."""
    if method not in METHODS:
        raise FoldGPTError(f"unknown method '{method}'; choose one of {', '.join(sorted(METHODS))}")
    return select_blocks_with(METHODS[method], method, model, windows, n_remove, seed)
