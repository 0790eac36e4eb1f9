"""Grouped parameter sharing (FoldGPT section 3): blocks in a group use the parent's linear weights.

The retained blocks, in order, are cut into contiguous groups; in each group one *parent* lends its linear weights
(every ``nn.Linear`` or GPT-2 ``Conv1D`` weight and bias in the block) to the other blocks, the *children*. Sharing
is by ``nn.Parameter``: each position keeps its own module objects, its own ``layer_idx`` (the KV cache needs one slot
per position) and its own norm weights (re-adapted during healing), as peft's ``replicate_layers`` does. Putting one
module object at two positions would make both write the same KV-cache slot.

The group map lives in ``config.foldgpt_sharing`` so that a saved compact folder knows how to rebuild the sharing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from foldgpt.arch.adapters import LINEAR_TYPES, adapter_for
from foldgpt.core.ranges import parse_ranges
from foldgpt.errors import FoldGPTError
from foldgpt.surgery.config import PARENTS

SHARING_KEY = "foldgpt_sharing"
PARENT_RULES = PARENTS


@dataclass(frozen=True)
class SharingPlan:
    """Contiguous groups of block positions, and the parent position of each group."""

    groups: list[list[int]]
    parents: list[int]

    def to_dict(self) -> dict:
        return {"groups": self.groups, "parents": self.parents}


def contiguous_groups(num_blocks: int, group_size: int) -> list[list[int]]:
    """Blocks ``0..num_blocks-1`` cut into consecutive groups of ``group_size`` (the last one may be smaller)."""
    if group_size < 1:
        raise FoldGPTError(f"--group-size {group_size} is out of range; use 1 (no sharing) or more")
    if group_size > num_blocks:
        raise FoldGPTError(f"--group-size {group_size} is larger than the {num_blocks} blocks of the model; use at most {num_blocks}")
    return [list(range(start, min(start + group_size, num_blocks))) for start in range(0, num_blocks, group_size)]


def parse_groups(text: str, num_blocks: int) -> list[list[int]]:
    """Groups from ``"0-3,4-5,6"``: ranges of block positions that must cover ``0..num_blocks-1`` in order."""
    groups = parse_ranges(text, "--groups")
    validate_groups(groups, num_blocks)
    return groups


def validate_groups(groups: list[list[int]], num_blocks: int) -> None:
    """Groups must be contiguous and cover every retained block exactly once, in order."""
    flat = [index for group in groups for index in group]
    if flat != list(range(num_blocks)) or any(not group for group in groups):
        raise FoldGPTError(
            f"groups {groups} must be contiguous ranges covering blocks 0..{num_blocks - 1} in order, each exactly once "
            f"(e.g. '0-3,4-7,...'); the model has {num_blocks} blocks"
        )
    if any(group != list(range(group[0], group[-1] + 1)) for group in groups):
        raise FoldGPTError(f"groups {groups} must each be a contiguous range of blocks")


def choose_parents(groups: list[list[int]], rule: str = "first", gate_values: list[float] | None = None) -> list[int]:
    """The parent of each group: its first block, its middle block, or the block whose gate stayed most open."""
    if rule == "first":
        return [group[0] for group in groups]
    if rule == "middle":
        return [group[(len(group) - 1) // 2] for group in groups]
    if rule == "largest-gate":
        if gate_values is None:
            raise FoldGPTError(
                "--parent largest-gate needs gate values: fold a folder written by 'foldgpt prune --method gates', "
                "or use --parent first"
            )
        return [max(group, key=lambda index: gate_values[index]) for group in groups]
    raise FoldGPTError(f"unknown --parent '{rule}'; choose one of {', '.join(PARENT_RULES)}")


def sharing_plan(model: PreTrainedModel) -> SharingPlan | None:
    """The group map a folded model carries in its config, or None for an unfolded model."""
    recorded = getattr(model.config, SHARING_KEY, None)
    if not recorded:
        return None
    return SharingPlan(groups=[list(g) for g in recorded["groups"]], parents=list(recorded["parents"]))


def fold(model: PreTrainedModel, groups: list[list[int]], parents: list[int]) -> PreTrainedModel:
    """Make every child block use its group parent's linear weights (same ``nn.Parameter``s), in place."""
    if sharing_plan(model) is not None:
        raise FoldGPTError("this model is already folded; fold the unfolded (pruned) model instead")
    layers = adapter_for(model).layers(model)
    validate_groups(groups, len(layers))
    if len(parents) != len(groups) or any(parent not in group for parent, group in zip(parents, groups)):
        raise FoldGPTError(f"parents {parents} must name one block inside each group of {groups}")
    for group, parent in zip(groups, parents):
        for child in group:
            if child != parent:
                share_linear_weights(layers[parent], layers[child])
    setattr(model.config, SHARING_KEY, SharingPlan(groups, parents).to_dict())
    return model


def apply_plan(model: PreTrainedModel, plan: SharingPlan) -> None:
    """Re-create the sharing of ``plan`` (used when loading a compact folder, where children arrive empty)."""
    layers = adapter_for(model).layers(model)
    for group, parent in zip(plan.groups, plan.parents):
        for child in group:
            if child != parent:
                share_linear_weights(layers[parent], layers[child])


def share_linear_weights(parent: nn.Module, child: nn.Module) -> None:
    """Point every linear layer's (``nn.Linear``, ``Conv1D``) weight and bias of ``child`` at ``parent``'s Parameter."""
    for name, source in parent.named_modules():
        if not isinstance(source, LINEAR_TYPES):
            continue
        target = child.get_submodule(name)
        source_shape, target_shape = tuple(source.weight.shape), tuple(target.weight.shape)  # type: ignore[arg-type]
        if target_shape != source_shape:
            raise FoldGPTError(f"cannot share '{name}': shapes {source_shape} and {target_shape} differ")
        target.weight = source.weight
        if source.bias is not None:
            target.bias = source.bias


def unshare(model: nn.Module) -> None:
    """Give every block position its own copy of the weights it shares with another position, in place.

    Works on any module tree (also a peft-wrapped model): a Parameter reached under several names inside the decoder
    blocks is cloned for every name after the first. Tied input/output embeddings live outside the blocks and stay
    tied.
    """
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = adapter_for(hf_model).layers(hf_model)
    seen: set[int] = set()
    for module in layers.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if id(parameter) in seen:
                setattr(module, name, nn.Parameter(parameter.detach().clone(), requires_grad=parameter.requires_grad))
            else:
                seen.add(id(parameter))
    if hasattr(hf_model.config, SHARING_KEY):
        delattr(hf_model.config, SHARING_KEY)


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts of a (possibly folded) model: what is stored once vs what a plain export materialises."""

    unique: int
    materialised: int
    per_group: list[dict]

    @property
    def compression(self) -> float:
        """Materialised over unique parameters (1.0 for an unfolded model)."""
        return self.materialised / self.unique

    def to_dict(self) -> dict:
        return {"unique": self.unique, "materialised": self.materialised, "compression": self.compression,
                "per_group": self.per_group}


def parameter_report(model: PreTrainedModel) -> ParameterReport:
    """Unique and materialised parameters of the whole model and of each group of blocks."""
    layers = adapter_for(model).layers(model)
    plan = sharing_plan(model) or SharingPlan([[i] for i in range(len(layers))], list(range(len(layers))))
    per_group = []
    for group, parent in zip(plan.groups, plan.parents):
        blocks = [layers[i] for i in group]
        per_group.append({
            "blocks": group,
            "parent": parent,
            "unique": _unique_count(p for block in blocks for p in block.parameters()),
            "materialised": sum(p.numel() for block in blocks for p in block.parameters()),
        })
    unique = _unique_count(model.parameters())
    shared_extra = sum(g["materialised"] - g["unique"] for g in per_group)
    return ParameterReport(unique=unique, materialised=unique + shared_extra, per_group=per_group)


def _unique_count(parameters) -> int:
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())
