"""Tie deltas as LoRA adapters, started from the SVD and fitted by local reconstruction (issue 22).

A tied child starts as a different function from its own block: adjacent blocks' weights are uncorrelated, and the
truncated SVD of ``W_child - W_parent`` alone makes it worse (docs/results/tie-init.md). What brings it close is a
local fit: the child's delta and norms trained so that the child's output matches the dense model's stream after
the child's original block, with the child's input taken from the plan's own model (its removals and the earlier
ties in place), as ReplaceMe fits its maps. So a tie also learns to stand in for removed blocks before it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from foldgpt.arch.adapters import adapter_for
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.surgery.config import TieConfig
from foldgpt.surgery.ties import TIES_KEY, block_linears, delta_module_names


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B, A`` with ``B @ A`` the rank-``rank`` truncated SVD of ``matrix`` (the singular values split evenly)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    if rank > len(s):  # a rank above the matrix's: the exact factors, padded with zeros
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - len(s))], dim=1)
        a = torch.cat([a, a.new_zeros(rank - len(s), a.shape[1])], dim=0)
    return b.to(matrix.dtype), a.to(matrix.dtype)


def delta_lora_config(names: Sequence[str], rank: int, fan_in_fan_out: bool):
    """The peft LoRA config of the deltas: rank ``rank`` at exactly ``names``, scale 1 (``lora_alpha = rank``)."""
    from peft import LoraConfig  # noqa: PLC0415  (peft is imported only where adapters are made)

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules="|".join(re.escape(name) for name in names), fan_in_fan_out=fan_in_fan_out)


def lora_layers(block: nn.Module) -> dict[str, Any]:
    """The peft LoRA layers inside ``block`` by name (each wraps one of the block's linear layers)."""
    return {name: module for name, module in block.named_modules() if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)}


def add_tie_deltas(model: PreTrainedModel, ties: Sequence[tuple[int, int]], rank: int,
                   own: dict[int, dict[str, torch.Tensor]]) -> nn.Module:
    """Wrap the folded ``model`` with one rank-``rank`` LoRA delta per linear layer of each tied child, started from
    the truncated SVD of ``own[child] - shared``; records the ties in the config. Returns the peft model."""
    from peft import get_peft_model  # noqa: PLC0415

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    children = [child for _, child in ties]
    names = delta_module_names(model, adapter.layers_path, children)
    transposed = any(isinstance(m, Conv1D) for child in children for m in block_linears(layers[child]).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, delta_lora_config(names, rank, transposed))
    with torch.no_grad():
        for child in children:
            for name, module in lora_layers(layers[child]).items():
                difference = own[child][name] - module.base_layer.weight
                b, a = truncated_svd(difference.T if transposed else difference, rank)
                module.lora_B["default"].weight.copy_(b)
                module.lora_A["default"].weight.copy_(a)
    setattr(model.config, TIES_KEY, {"ties": [list(tie) for tie in ties], "rank": rank})
    return peft_model


def fit_tie_deltas(student: nn.Module, teacher: PreTrainedModel, windows: torch.Tensor, ties: Sequence[tuple[int, int]],
                   original: Sequence[int], config: TieConfig) -> list[dict]:
    """Fit each tied child's delta and norms, in order, so that its output matches the teacher's stream after block
    ``original[child]`` (its index in the dense model); returns each fit's first and last loss.

    ``student`` is the peft model of ``add_tie_deltas``; its input at the child is computed with the ties fitted so
    far in place. The loss is the squared error of the child's output over the squared size of its dense update.
    """
    base = student.get_base_model()
    runner, dense = ResidentBlocks(base), ResidentBlocks(teacher)
    adapter = adapter_for(base)
    report = []
    for _, child in sorted(ties, key=lambda tie: tie[1]):
        inputs, targets = [], []
        with torch.no_grad():
            for window in windows:
                shape = (1, window.numel())
                hidden = runner.embed(window[None])
                for index in range(child):
                    hidden = runner.run_block(index, hidden, shape)
                inputs.append(hidden)
                stream = dense.embed(window[None])
                for index in range(original[child] + 1):
                    stream = dense.run_block(index, stream, shape)
                targets.append(stream)
        block = runner.blocks[child]
        parameters = [p for m in lora_layers(block).values() for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]
        parameters += [p for norm in adapter.block_norms(block) for p in norm.parameters()]
        report.append({"child": child, "losses": _fit(runner, child, parameters, inputs, targets, config)})
    return report


def _fit(runner: ResidentBlocks, child: int, parameters: list[nn.Parameter], inputs: list[torch.Tensor],
         targets: list[torch.Tensor], config: TieConfig) -> list[float]:
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=config.fit_lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(config.fit_steps):
        order = torch.randperm(len(inputs), generator=generator)[: config.fit_batch]
        optimizer.zero_grad(set_to_none=True)
        loss = sum(((runner.call_block(child, inputs[i], inputs[i].shape[:2]) - targets[i]).pow(2).sum()
                    / (targets[i] - inputs[i]).pow(2).sum().clamp_min(1e-12)) for i in order) / len(order)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    for p in parameters:
        p.requires_grad_(False)
    return [losses[0], losses[-1]] if losses else []
