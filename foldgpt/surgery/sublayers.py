"""Removing one branch of a block (its attention or its MLP) exactly, and the format that records it.

A block computes two residual updates, ``h += attention(...)`` and ``h += mlp(...)``. Removing a branch means its
update is exactly zero: the block then applies only its other branch. When both branches of a block go, the block
itself is removed (``foldgpt.removal.remove_blocks``), which is exact too.

Saved format (written by ``foldgpt prune --method gates --granularity sublayer``):

- the plain Hugging Face folder keeps every tensor, but a removed branch has its output projection (weight and bias;
  the adapter's ``attention_output`` / ``mlp_output``) zeroed, so its update is exactly 0 and vanilla
  ``AutoModelForCausalLM.from_pretrained`` gives the pruned model's logits (no parameters saved there);
- ``config.json`` carries ``foldgpt_removed_sublayers = {"attention": [blocks], "mlp": [blocks]}`` in the folder's
  own block numbering (``foldgpt.json`` also lists them in the original numbering);
- ``foldgpt.load`` reads that key and replaces each removed branch (the adapter's ``attention`` module, or the MLP's
  modules: ``mlp``, or OPT's ``fc1`` and ``fc2``) by a ``ZeroBranch`` that returns zeros of its input's shape and
  holds no weights, so the parameters and the memory really drop, with the same logits as the zeroed folder. A zero
  attention still records its tokens in the KV cache (keys and values of width 1: 8 bytes per token per branch) so
  that generation computes the same positions and masks.

A model whose branches were replaced can be evaluated and generate; folding, healing and exporting it are refused
(re-run ``prune`` without ``--granularity sublayer``, or use the zeroed plain folder as it is).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from foldgpt.arch.adapters import adapter_for
from foldgpt.errors import FoldGPTError

BRANCHES = ("attention", "mlp")
REMOVED_SUBLAYERS_KEY = "foldgpt_removed_sublayers"


class ZeroBranch(nn.Module):
    """A removed branch: returns zeros shaped like its input (a ``(zeros, None)`` pair for an attention), no weights."""

    def __init__(self, attention: bool, layer_idx: int | None = None) -> None:
        super().__init__()
        self.attention = attention
        if layer_idx is not None:
            self.layer_idx = layer_idx  # renumbered by removal like any attention's

    def forward(self, *args: object, **kwargs: object) -> object:
        hidden = args[0] if args else kwargs["hidden_states"]
        assert isinstance(hidden, torch.Tensor)
        zeros = torch.zeros_like(hidden)
        if not self.attention:
            return zeros
        cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
        if cache is not None and hasattr(cache, "update") and hasattr(self, "layer_idx"):
            # keep the cache's position count for this layer: one zero channel per token, a single head
            marker = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(marker, marker, self.layer_idx)
        return zeros, None


def check_sublayer_removal_supported(model: PreTrainedModel) -> None:
    """Refuse families where zeroing one branch is not the same as removing it."""
    config = model.config
    if config.model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise FoldGPTError("sub-layer removal is not supported for post-LayerNorm OPT (do_layer_norm_before=false): the "
                           "residual stream is renormalised after each branch, so a zeroed branch still changes the "
                           "block and a block with both branches closed is not the identity; use --granularity block")
    if getattr(config, "add_cross_attention", False):
        raise FoldGPTError("sub-layer removal is not supported for models with cross-attention; use --granularity block")


def branch_modules(model: PreTrainedModel, block: nn.Module, branch: str) -> list[tuple[str, nn.Module]]:
    """The modules that make up ``branch`` of ``block`` (their names relative to the block)."""
    adapter = adapter_for(model)
    names = adapter.branch_parts(branch)
    return [(name, block.get_submodule(name)) for name in names]


def zero_branch_output(model: PreTrainedModel, block_index: int, branch: str) -> None:
    """Zero the output projection (weight and bias) of ``branch`` in block ``block_index``: its update becomes 0."""
    adapter = adapter_for(model)
    block = adapter.layers(model)[block_index]
    output = adapter.attention_output_layer(block) if branch == "attention" else adapter.mlp_output_layer(block)
    with torch.no_grad():
        for parameter in output.parameters():
            parameter.zero_()


def removed_sublayers(model: PreTrainedModel) -> dict[str, list[int]]:
    """``{"attention": [...], "mlp": [...]}`` recorded in the model's config (empty lists for a normal model)."""
    recorded = getattr(model.config, REMOVED_SUBLAYERS_KEY, None) or {}
    return {branch: sorted(int(i) for i in recorded.get(branch, [])) for branch in BRANCHES}


def has_removed_sublayers(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and any(removed_sublayers(model).values())  # type: ignore[arg-type]


def refuse_removed_sublayers(model: nn.Module, what: str) -> None:
    """One-line error for stages that cannot take a model with removed branches yet."""
    if has_removed_sublayers(model):
        raise FoldGPTError(f"{what} is not supported for a model with removed attention/MLP sub-layers "
                           f"({REMOVED_SUBLAYERS_KEY} in its config) yet; evaluate it as it is, or prune with --granularity block")


def drop_removed_sublayers(model: PreTrainedModel) -> PreTrainedModel:
    """Replace every branch listed in the config by a weightless ``ZeroBranch``, in place (see the module docstring)."""
    removed = removed_sublayers(model)
    if not any(removed.values()):
        return model
    check_sublayer_removal_supported(model)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    for branch in BRANCHES:
        for index in removed[branch]:
            if not 0 <= index < len(layers):
                raise FoldGPTError(f"{REMOVED_SUBLAYERS_KEY} names block {index} but the model has {len(layers)} blocks; the config is damaged")
            block = layers[index]
            for name, module in branch_modules(model, block, branch):
                if isinstance(module, ZeroBranch):
                    continue
                layer_idx = getattr(module, "layer_idx", index) if branch == "attention" else None
                owner_name, _, attribute = name.rpartition(".")
                owner = block.get_submodule(owner_name) if owner_name else block
                setattr(owner, attribute, ZeroBranch(branch == "attention", layer_idx))
    return model
