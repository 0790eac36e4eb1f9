"""Ties: a kept block runs its neighbour's linear weights plus a low-rank delta of its own (issue 22).

A tie ``(parent, child)`` makes the child block share the parent's linear weights (``foldgpt.surgery.sharing``'s
groups of two) and keeps, per projection of the child, a rank-``r`` delta ``B A`` and its own norms. The delta is a
peft LoRA adapter on the child's projections only (scale 1: ``lora_alpha = r``), so the compact folder stores it
unmerged, ``foldgpt.load`` attaches it, healing trains it further, and the plain export merges it per position.

Indices here are the model's *original* block indices; ``tie_groups`` turns a plan into the groups over the kept
blocks that ``fold`` takes. Fitting the deltas (local reconstruction) is ``foldgpt.healing.ties``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from foldgpt.arch.adapters import LINEAR_TYPES
from foldgpt.errors import FoldGPTError

TIES_KEY = "foldgpt_ties"
"""The config key of a tied model: ``{"ties": [[parent, child], ...] (current positions), "rank": r}``."""


@dataclass(frozen=True)
class TiePlan:
    """Blocks removed and blocks tied, in the original model's indices; ``rank`` is each tie's delta rank."""

    removed: tuple[int, ...]
    ties: tuple[tuple[int, int], ...]
    rank: int

    def to_dict(self) -> dict:
        return {"removed": list(self.removed), "ties": [list(tie) for tie in self.ties], "rank": self.rank}


def parse_ties(text: str) -> tuple[tuple[int, int], ...]:
    """``"11:12,16:15"`` -> ``((11, 12), (16, 15))``: parent, then child."""
    ties = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        parent, sep, child = item.partition(":")
        if not sep or not parent.strip().isdigit() or not child.strip().isdigit():
            raise FoldGPTError(f"--ties '{text}': '{item}' is not PARENT:CHILD; give block indices, e.g. '11:12,16:15'")
        ties.append((int(parent), int(child)))
    if not ties:
        raise FoldGPTError("--ties is empty; give at least one PARENT:CHILD, e.g. '11:12'")
    return tuple(ties)


def validate_tie_plan(plan: TiePlan, num_blocks: int) -> None:
    """One-line errors for a plan that cannot be built: a tie to a removed block, across a removed block (parent and
    child must be neighbours in the original model), a block in two ties, or a rank below 1."""
    removed = set(plan.removed)
    used: set[int] = set()
    if plan.rank < 1:
        raise FoldGPTError(f"--tie-rank {plan.rank} is out of range; use 1 or more, e.g. 64")
    for parent, child in plan.ties:
        for index in (parent, child):
            if not 0 <= index < num_blocks:
                raise FoldGPTError(f"tie {parent}:{child}: block {index} does not exist; the model has blocks 0..{num_blocks - 1}")
            if index in removed:
                raise FoldGPTError(f"tie {parent}:{child}: block {index} is removed; tie two kept blocks")
        if abs(parent - child) != 1:
            between = "across removed blocks" if all(i in removed for i in range(min(parent, child) + 1, max(parent, child))) else "between blocks that are not neighbours"
            raise FoldGPTError(f"tie {parent}:{child} is {between}; a child must be its parent's neighbour in the "
                               f"original model, e.g. {parent}:{parent + 1}")
        if parent in used or child in used:
            raise FoldGPTError(f"tie {parent}:{child}: block {parent if parent in used else child} is already in another "
                               "tie; each block may be in one tie")
        used.update((parent, child))


def kept_blocks(num_blocks: int, removed: Sequence[int]) -> list[int]:
    """The original indices of the blocks a removal keeps, in order (position ``p`` of the pruned model is ``kept[p]``)."""
    gone = set(removed)
    return [index for index in range(num_blocks) if index not in gone]


def tie_positions(plan: TiePlan, num_blocks: int) -> list[tuple[int, int]]:
    """The plan's ties as ``(parent, child)`` positions in the pruned model."""
    position = {index: p for p, index in enumerate(kept_blocks(num_blocks, plan.removed))}
    return [(position[parent], position[child]) for parent, child in plan.ties]


def tie_groups(plan: TiePlan, num_blocks: int) -> tuple[list[list[int]], list[int]]:
    """The groups over the pruned model's positions that ``fold`` takes (each tie a group of two), and their parents."""
    validate_tie_plan(plan, num_blocks)
    ties = {child: parent for parent, child in tie_positions(plan, num_blocks)}
    partner = {**ties, **{parent: child for child, parent in ties.items()}}
    groups: list[list[int]] = []
    parents: list[int] = []
    for position in range(len(kept_blocks(num_blocks, plan.removed))):
        if position in partner and partner[position] < position:
            continue  # already in its group
        if position in partner:
            groups.append([position, partner[position]])
            parents.append(position if position not in ties else partner[position])
        else:
            groups.append([position])
            parents.append(position)
    return groups, parents


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear layers (``nn.Linear``, GPT-2 ``Conv1D``) by name inside the block."""
    return {name: module for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)}


def linear_parameters(block: nn.Module) -> int:
    """The parameters a tie saves: every weight and bias of the block's linear layers."""
    return sum(p.numel() for module in block_linears(block).values() for p in module.parameters(recurse=False))


def delta_parameters(block: nn.Module, rank: int) -> int:
    """The parameters a rank-``rank`` delta keeps: ``rank * (in + out)`` per linear layer."""
    shapes = [tuple(module.weight.shape) for module in block_linears(block).values()]  # type: ignore[arg-type]
    return sum(rank * (int(shape[0]) + int(shape[1])) for shape in shapes)


def tie_saving(block: nn.Module, rank: int) -> int:
    """Unique parameters one tie removes from the model (its linear weights, less the delta it keeps)."""
    return linear_parameters(block) - delta_parameters(block, rank)


def tie_candidates(ranking: Sequence[int], removed: Sequence[int], count: int, num_blocks: int) -> tuple[tuple[int, int], ...]:
    """``(parent, child)`` for the next ``count`` blocks of ``ranking`` (most redundant first) that are kept and have a
    kept neighbour in no other tie: the child ties to its neighbour before it, else after it."""
    gone, used = set(removed), set[int]()
    ties: list[tuple[int, int]] = []
    for child in ranking:
        if len(ties) == count:
            break
        if child in gone or child in used:
            continue
        for parent in (child - 1, child + 1):
            if 0 <= parent < num_blocks and parent not in gone and parent not in used:
                ties.append((parent, child))
                used.update((parent, child))
                break
    return tuple(ties)


def delta_module_names(model: nn.Module, layers_prefix: str, children: Sequence[int]) -> list[str]:
    """Full names of the child positions' linear layers (the LoRA targets of their deltas)."""
    names = []
    for child in children:
        block = model.get_submodule(f"{layers_prefix}.{child}")
        names += [f"{layers_prefix}.{child}.{name}" for name in block_linears(block)]
    return names


def tie_record(model: nn.Module) -> dict | None:
    """The ties a (possibly peft-wrapped) model records in its config, or None for an untied model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), TIES_KEY, None) or None
