"""Turning a removal target into a number of blocks.

Targets: ``--remove N`` blocks, ``--remove-ratio R`` of the blocks, ``--target-params F`` (keep at most a fraction F
of the whole model's parameters, embeddings included) or ``--target-flops F`` (keep at most a fraction F of the
forward FLOPs per token). Every selection method takes every target: the target fixes how many blocks go, the
method decides which. That is exact for the families we support, whose blocks all have the same size; a model with
blocks of different sizes is refused for the budget targets.

FLOPs per token at context length ``c`` count 2 per multiply-accumulate: ``2 * (weights of every nn.Linear or GPT-2
Conv1D, lm_head included)`` plus, per block, ``4 * c * (attention heads * head dim)`` for the attention scores and the
weighted sum.

Sub-layer targets (``--granularity sublayer``, ``sublayer_budget``): each attention and each MLP has a cost, and the
target is a cost to remove. ``--remove N`` counts sub-layers (each costs 1; ``--remove-ratio R`` is ``round(R * 2 *
blocks)``), ``--target-params F`` / ``--target-flops F`` cost each sub-layer its parameters / its FLOPs per token
(an attention's include its score term) and ask for ``(1 - F)`` of the whole model's. The sub-layers with the
smallest gates are removed until the removed cost reaches the target, so the fewest sub-layers by ascending gate.
"""

from __future__ import annotations

import math

from torch import nn
from transformers import PreTrainedModel

from foldgpt.arch.adapters import LINEAR_TYPES, adapter_for
from foldgpt.errors import FoldGPTError
from foldgpt.surgery.config import RemovalTarget  # declared there, torch-free; used here and re-exported
from foldgpt.surgery.removal import blocks_to_remove_count, count_parameters
from foldgpt.surgery.sublayers import BRANCHES, ZeroBranch


def attention_score_flops(model: PreTrainedModel, context: int) -> int:
    """``4 * c * heads * head_dim``: one block's attention scores and weighted sum per token at context ``c``."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 4 * context * config.num_attention_heads * head_dim


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, LINEAR_TYPES))


def block_flops_per_token(model: PreTrainedModel, context: int) -> list[int]:
    """Forward FLOPs per token of each block at context length ``context`` (no score term for a removed attention)."""

    adapter = adapter_for(model)
    attention = attention_score_flops(model, context)
    return [2 * linear_weights(block) + (0 if isinstance(adapter.attention_module(block), ZeroBranch) else attention)
            for block in adapter.layers(model)]


def model_flops_per_token(model: PreTrainedModel, context: int) -> int:
    """Forward FLOPs per token of the whole model (blocks plus the output head)."""
    blocks = block_flops_per_token(model, context)
    head = model.get_output_embeddings()
    return sum(blocks) + (2 * head.weight.numel() if head is not None else 0)


def _blocks_for_fraction(costs: list[int], total: int, fraction: float, what: str) -> int:
    """Fewest blocks to remove so that ``total - removed cost <= fraction * total`` (blocks of equal cost)."""
    if not 0.0 < fraction < 1.0:
        raise FoldGPTError(f"--target-{what} {fraction} is out of range; give the fraction to keep, between 0 and 1 (e.g. 0.75)")
    if len(set(costs)) != 1:
        raise FoldGPTError(f"--target-{what} needs blocks of equal size and this model's differ; use --remove N instead")
    needed = math.ceil((total - fraction * total) / costs[0] - 1e-9)
    if needed >= len(costs):
        smallest = (total - costs[0] * (len(costs) - 1)) / total
        raise FoldGPTError(f"--target-{what} {fraction} cannot be met by removing blocks (at least one stays): the smallest reachable is {smallest:.3f}")
    return max(needed, 1)


def blocks_to_remove(model: PreTrainedModel, target: RemovalTarget) -> int:
    """The number of blocks ``target`` asks to remove from ``model``."""
    given = target.given()
    if len(given) != 1:
        raise FoldGPTError("give exactly one target: --remove N, --remove-ratio R, --target-params F or --target-flops F")
    layers = adapter_for(model).layers(model)
    if target.target_params is not None:
        costs = [count_parameters(block) for block in layers]
        return _blocks_for_fraction(costs, count_parameters(model), target.target_params, "params")
    if target.target_flops is not None:
        costs = block_flops_per_token(model, target.flops_context)
        return _blocks_for_fraction(costs, model_flops_per_token(model, target.flops_context), target.target_flops, "flops")
    return blocks_to_remove_count(len(layers), target.remove, target.remove_ratio)


def blocks_to_remove_with_sharing(model: PreTrainedModel, target_params: float, group_size: int) -> int:
    """Fewest blocks to remove so that, after folding the rest into groups of ``group_size``, the model's unique
    parameters are at most ``target_params`` of today's (``compress --target-params`` with sharing)."""
    if not 0.0 < target_params < 1.0:
        raise FoldGPTError(f"--target-params {target_params} is out of range; give the fraction to keep, between 0 and 1 (e.g. 0.75)")
    layers = adapter_for(model).layers(model)
    total, depth = count_parameters(model), len(layers)
    block, shared = count_parameters(layers[0]), linear_weights(layers[0]) + _linear_biases(layers[0])
    for removed in range(1, depth):
        kept = depth - removed
        children = kept - math.ceil(kept / group_size)
        if total - removed * block - children * shared <= target_params * total:
            return removed
    raise FoldGPTError(f"--target-params {target_params} cannot be met with --group-size {group_size}; give a larger fraction")


def _linear_biases(module: nn.Module) -> int:
    return sum(m.bias.numel() for m in module.modules() if isinstance(m, LINEAR_TYPES) and getattr(m, "bias", None) is not None)


def branch_parameters(model: PreTrainedModel, block: nn.Module, branch: str) -> int:
    """Parameters of one branch (``"attention"`` or ``"mlp"``) of ``block``: what removing it saves."""
    return sum(count_parameters(block.get_submodule(name)) for name in adapter_for(model).branch_parts(branch))


def branch_flops_per_token(model: PreTrainedModel, block: nn.Module, branch: str, context: int) -> int:
    """Forward FLOPs per token of one branch; an attention's include its score term."""
    linear = sum(linear_weights(block.get_submodule(name)) for name in adapter_for(model).branch_parts(branch))
    return 2 * linear + (attention_score_flops(model, context) if branch == "attention" else 0)


def sublayer_budget(model: PreTrainedModel, target: RemovalTarget) -> tuple[list[float], float]:
    """Each sub-layer's cost (gate order: attention 0, MLP 0, attention 1, ...) and the cost ``target`` asks to remove."""

    given = target.given()
    if len(given) != 1:
        raise FoldGPTError("give exactly one target: --remove N, --remove-ratio R, --target-params F or --target-flops F")
    layers = adapter_for(model).layers(model)
    count = 2 * len(layers)
    if target.target_params is not None or target.target_flops is not None:
        what = "params" if target.target_params is not None else "flops"
        fraction = target.target_params if target.target_params is not None else target.target_flops
        assert fraction is not None
        if not 0.0 < fraction < 1.0:
            raise FoldGPTError(f"--target-{what} {fraction} is out of range; give the fraction to keep, between 0 and 1 (e.g. 0.75)")
        if what == "params":
            costs = [float(branch_parameters(model, layer, branch)) for layer in layers for branch in BRANCHES]
            total = count_parameters(model)
        else:
            costs = [float(branch_flops_per_token(model, layer, branch, target.flops_context)) for layer in layers for branch in BRANCHES]
            total = model_flops_per_token(model, target.flops_context)
        needed = (1.0 - fraction) * total
        reachable = sum(costs) - min(costs)
        if needed > reachable:
            raise FoldGPTError(f"--target-{what} {fraction} cannot be met by removing sub-layers (at least one stays): "
                               f"the smallest reachable is {(total - reachable) / total:.3f}")
        return costs, needed
    if target.remove_ratio is not None:
        if not 0.0 < target.remove_ratio < 1.0:
            raise FoldGPTError(f"--remove-ratio {target.remove_ratio} is out of range; use a fraction between 0 and 1, e.g. 0.2")
        remove = round(target.remove_ratio * count)
        if remove < 1:
            raise FoldGPTError(f"--remove-ratio {target.remove_ratio} of {count} sub-layers rounds to 0; use a larger ratio")
    else:
        assert target.remove is not None
        remove = target.remove
    if not 1 <= remove < count:
        raise FoldGPTError(f"--remove {remove} is out of range: with --granularity sublayer it counts sub-layers and the model "
                           f"has {count} (an attention and an MLP per block); remove between 1 and {count - 1}")
    return [1.0] * count, float(remove)
