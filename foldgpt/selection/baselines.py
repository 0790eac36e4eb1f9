"""Controls that use no data: ``last`` (drop the last blocks before the final one) and ``random`` (seeded)."""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel

from foldgpt.arch.adapters import adapter_for
from foldgpt.selection.base import Selection


def select_last(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
    """Blocks ``L-1-n .. L-2``: the deepest ones except the final block, which most papers find essential."""
    num_blocks = len(adapter_for(model).layers(model))
    first = max(0, num_blocks - 1 - n_remove)
    return Selection(method="last", removed=list(range(first, first + n_remove)))


def select_random(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
    """A seeded uniform draw: the control every scoring method must beat."""
    num_blocks = len(adapter_for(model).layers(model))
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    return Selection(method="random", removed=sorted(order[:n_remove]), details={"seed": seed})
