"""Removing decoder blocks so that the result is exactly a smaller model of the same architecture.

Three things must change together, or the model silently goes wrong (docs/design.md, "Pitfalls known from peers"):
the layer list; every ``layer_idx`` (it indexes the KV cache); and the config (``num_hidden_layers``, which the
forward loop reads, and ``layer_types``, which picks each layer's mask and rope and is validated on save).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from foldgpt.arch.adapters import adapter_for
from foldgpt.errors import FoldGPTError

PER_LAYER_CONFIG_LISTS = ("layer_types",)
"""Config attributes holding one entry per block; they are sliced to the kept blocks."""


def blocks_to_remove_count(num_blocks: int, remove: int | None = None, remove_ratio: float | None = None) -> int:
    """How many blocks a ``--remove N`` or ``--remove-ratio R`` target means, checked to leave at least one."""
    if (remove is None) == (remove_ratio is None):
        raise FoldGPTError("give exactly one target: --remove N or --remove-ratio R")
    if remove_ratio is not None:
        if not 0.0 < remove_ratio < 1.0:
            raise FoldGPTError(f"--remove-ratio {remove_ratio} is out of range; use a fraction between 0 and 1, e.g. 0.2")
        remove = round(remove_ratio * num_blocks)
        if remove < 1:
            raise FoldGPTError(f"--remove-ratio {remove_ratio} of {num_blocks} blocks rounds to 0 blocks; use a larger ratio")
    assert remove is not None
    if not 1 <= remove < num_blocks:
        raise FoldGPTError(f"--remove {remove} is out of range: the model has {num_blocks} blocks; remove between 1 and {num_blocks - 1}")
    return remove


def validate_removed(removed: Sequence[int], num_blocks: int) -> list[int]:
    """Sorted unique indices, each a real block, at least one block kept."""
    unique = sorted(set(removed))
    if len(unique) != len(removed):
        raise FoldGPTError(f"removed blocks {list(removed)} contain duplicates")
    if any(not 0 <= index < num_blocks for index in unique):
        raise FoldGPTError(f"removed blocks {unique} must be between 0 and {num_blocks - 1}")
    if len(unique) >= num_blocks:
        raise FoldGPTError(f"cannot remove all {num_blocks} blocks; keep at least one")
    return unique


def shrink_config(config: PretrainedConfig, kept: Sequence[int]) -> None:
    """Set ``num_hidden_layers`` and slice per-layer lists (``layer_types``) to the kept blocks, in place."""
    old_depth = config.num_hidden_layers
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == old_depth:
            setattr(config, name, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def renumber_layer_indices(layers: nn.ModuleList) -> None:
    """Set every ``layer_idx`` attribute inside block ``i`` (the block's, its attention's) to ``i``."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, "layer_idx", new_index)  # noqa: B010 (an attribute torch types as Tensor | Module)


def remove_blocks(model: PreTrainedModel, removed: Sequence[int]) -> PreTrainedModel:
    """Delete the blocks ``removed`` (original numbering) from ``model`` in place, and return it."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    removed_sorted = validate_removed(removed, len(layers))
    removed_set = set(removed_sorted)
    kept = [i for i in range(len(layers)) if i not in removed_set]
    new_layers = nn.ModuleList([layers[i] for i in kept])
    renumber_layer_indices(new_layers)
    adapter.set_layers(model, new_layers)
    shrink_config(model.config, kept)
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@contextmanager
def blocks_removed_temporarily(model: PreTrainedModel, removed: Sequence[int]) -> Iterator[PreTrainedModel]:
    """Run ``model`` without the blocks ``removed`` inside the context; restore it exactly afterwards.

    Used by search methods (SLEB) that score many candidate removals without copying the model.
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    saved_config = {name: getattr(model.config, name, None) for name in ("num_hidden_layers", *PER_LAYER_CONFIG_LISTS)}
    try:
        yield remove_blocks(model, removed)
    finally:
        adapter.set_layers(model, layers)
        renumber_layer_indices(layers)
        for name, value in saved_config.items():
            if value is not None:
                setattr(model.config, name, value)
