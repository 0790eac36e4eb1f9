"""The common shape of block-selection methods, and the registry the CLI reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel


@dataclass
class Selection:
    """Which blocks a method removes (original numbering, sorted) and why.

    ``removed_sublayers`` (sub-layer gates only): branches removed from blocks that stay, ``{"attention": [blocks],
    "mlp": [blocks]}``, original numbering; empty for block methods.
    """

    method: str
    removed: list[int]
    scores: list[float] | None = None
    details: dict = field(default_factory=dict)
    seconds: float = 0.0
    removed_sublayers: dict[str, list[int]] = field(default_factory=dict)


SelectionMethod = Callable[[PreTrainedModel, torch.Tensor, int, int], Selection]
"""``method(model, calibration_windows, n_remove, seed) -> Selection``."""



def select_blocks_with(
    function: SelectionMethod, name: str, model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int
) -> Selection:
    """Run a selection function (registered or configured), timing it."""
    start = time.perf_counter()
    selection = function(model, windows, n_remove, seed)
    selection.method = name
    selection.seconds = time.perf_counter() - start
    return selection
