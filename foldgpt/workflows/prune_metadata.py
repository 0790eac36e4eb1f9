"""What ``foldgpt.json`` of a pruned folder records: one builder for both backends (in memory and block by block),
so the two cannot drift apart key by key."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from foldgpt._version import __version__
from foldgpt.arch.adapters import adapter_for
from foldgpt.core.lineage import in_original_numbering
from foldgpt.core.manifest import hub_origin
from foldgpt.data.config import CalibrationConfig
from foldgpt.selection.base import Selection
from foldgpt.surgery.budget import RemovalTarget, branch_flops_per_token, branch_parameters, model_flops_per_token
from foldgpt.surgery.removal import count_parameters


@dataclass(frozen=True)
class ModelCost:
    """A model's size as the metadata reports it: its parameters and its matmul FLOPs per token."""

    parameters: int
    flops_per_token: int


def model_cost(model: PreTrainedModel, flops_context: int, removed_branches: dict[str, list[int]] | None = None) -> ModelCost:
    """``model``'s parameters and FLOPs per token at ``flops_context``, less those of ``removed_branches`` (``{branch:
    [blocks]}``, zeroed in place but still holding their tensors: what the saved folder will no longer count)."""
    parameters = count_parameters(model)
    flops = model_flops_per_token(model, flops_context)
    if removed_branches:
        parameters -= _branch_total(model, removed_branches, lambda block, branch: branch_parameters(model, block, branch))
        flops -= _branch_total(model, removed_branches,
                               lambda block, branch: branch_flops_per_token(model, block, branch, flops_context))
    return ModelCost(parameters=parameters, flops_per_token=flops)


def _branch_total(model: PreTrainedModel, removed: dict[str, list[int]], cost: Callable[[nn.Module, str], int]) -> int:
    layers = adapter_for(model).layers(model)
    return sum(cost(layers[index], branch) for branch, blocks in removed.items() for index in blocks)


def prune_metadata(
    *,
    source: str,
    method: str,
    selection: Selection,
    num_blocks: int,
    n_remove: int,
    calibration: CalibrationConfig | None,
    target: RemovalTarget,
    before: ModelCost,
    after: ModelCost,
    started: float,
    given_blocks: bool = False,
    extra: dict | None = None,
) -> dict:
    """The ``foldgpt.json`` of a pruned folder; ``started`` is the ``time.perf_counter()`` the work began at,
    ``given_blocks`` records the target as the blocks named (``prune(blocks=...)``), and ``extra`` (a backend's own
    keys) comes last."""
    metadata = {
        "foldgpt_version": __version__,
        "stage": "prune",
        "source_model": source,
        "source_hub": hub_origin(source),  # Hub ID, revision and commit of a model from the Hugging Face cache
        "method": method,
        "num_blocks_before": num_blocks,
        "num_blocks_after": num_blocks - n_remove,
        "removed": selection.removed,
        "removed_original": in_original_numbering(source, selection.removed, num_blocks),
        "scores": selection.scores,
        "details": selection.details,
        "calibration": None if calibration is None else vars(calibration),
        "parameters_before": before.parameters,
        "parameters_after": after.parameters,
        "target": {"blocks": selection.removed} if given_blocks else {name: getattr(target, name) for name in target.given()},
        "flops_per_token_before": before.flops_per_token,
        "flops_per_token_after": after.flops_per_token,
        "flops_context": target.flops_context,
        "selection_seconds": selection.seconds,
        "total_seconds": time.perf_counter() - started,
    }
    metadata.update(extra or {})
    return metadata
