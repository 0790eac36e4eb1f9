"""Healing's training data: shuffled windows, which windows each step sees, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from foldgpt.data.text import load_text
from foldgpt.data.windows import tokenize
from foldgpt.errors import FoldGPTError
from foldgpt.healing.config import HealConfig


def healing_windows(tokenizer, spec: str, seqlen: int, eval_count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data cut into non-overlapping ``seqlen`` windows, shuffled with ``seed``: (training windows, held-out ones)."""
    ids = tokenize(tokenizer, load_text(spec, "calibration"))
    count = len(ids) // seqlen
    if count < eval_count + 1:
        raise FoldGPTError(
            f"healing data '{spec}' has {len(ids)} tokens: {count} windows of {seqlen}, but {eval_count} held-out windows "
            "plus at least 1 training window are needed; use more text, a smaller --seqlen or fewer --eval-windows"
        )
    windows = ids[: count * seqlen].view(count, seqlen)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return windows[order[eval_count:]], windows[order[:eval_count]]


class WindowSchedule:
    """Which training windows each step's micro-batches see: position ``p`` of the run is window ``perm_e[p % n]``,
    with one seeded permutation per pass ``e = p // n`` -- a pure function of the step, so resuming is exact."""

    def __init__(self, count: int, seed: int) -> None:
        self.count = count
        self.seed = seed
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            if epoch == 0:
                self._permutations[0] = list(range(self.count))  # already shuffled by healing_windows
            else:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._permutations[epoch] = torch.randperm(self.count, generator=generator).tolist()
        return self._permutations[epoch]

    def indices(self, step: int, micro: int, config: HealConfig, rank: int = 0) -> list[int]:
        """Window indices of micro-batch ``micro`` of ``step`` (1-based) on data-parallel process ``rank``: the step's
        ``grad_accum * world_size`` micro-batches in order, ``grad_accum`` consecutive ones per rank."""
        first = (((step - 1) * config.world_size + rank) * config.grad_accum + micro) * config.micro_batch
        return [self._permutation(p // self.count)[p % self.count] for p in range(first, first + config.micro_batch)]


def learning_rate(step: int, config: HealConfig) -> float:
    """The learning rate of ``step`` (1-based): linear warm-up, then the schedule's decay (never exactly 0)."""
    total = config.total_steps
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    progress = (step - config.warmup_steps - 1) / max(1, total - config.warmup_steps)
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
