"""The trainable part of healing: one LoRA adapter per block position, plus the per-block norms."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from foldgpt.arch.adapters import adapter_for, linear_layers_by_name
from foldgpt.errors import FoldGPTError
from foldgpt.healing.config import HealConfig
from foldgpt.surgery.ties import delta_module_names, tie_record
from foldgpt.train.lora import norm_parameters


def add_lora(model: Any, config: HealConfig) -> nn.Module:
    """Wrap ``model`` in place with one LoRA adapter per targeted linear layer of every block position; base frozen,
    norms trainable (``config.train_norms``). Returns the peft model.

    A tied model (``foldgpt fold --ties``) arrives as a peft model holding its children's deltas: they are carried
    into the new adapter at their own rank and scale (``rank_pattern``, ``alpha_pattern``), frozen unless
    ``config.train_tie_deltas`` (trained at the heal's rate they undid the local fit on SmolLM2).
    """
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    model, carried, deltas, tie_rank = _unwrapped_ties(model)
    targets = lora_targets(model, config)
    linear = linear_layers_by_name(model)
    missing = [name for name in targets if name not in linear]
    if missing:
        raise FoldGPTError(
            f"LoRA target module(s) {', '.join(missing)} not found in the model; it has linear layers named {', '.join(sorted(linear))}"
        )
    torch.manual_seed(config.seed)  # LoRA's A matrices are initialised at random
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only scales by alpha / r
        lora_dropout=config.lora_dropout,
        target_modules=list(targets) + deltas,
        fan_in_fan_out=isinstance(linear[targets[0]], Conv1D),  # GPT-2's Conv1D stores its weight transposed
        bias="none",
        task_type="CAUSAL_LM",
        rank_pattern={re.escape(name): tie_rank for name in deltas},
        alpha_pattern={re.escape(name): tie_rank for name in deltas},  # scale 1, as the tie's own adapter
    )
    with warnings.catch_warnings():  # peft still asks transformers for the deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    if carried:
        parameters = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, value in carried.items():
                parameters[name].copy_(value)
                parameters[name].requires_grad_(config.train_tie_deltas)
    if config.train_norms:
        for parameter in norm_parameters(model):
            parameter.requires_grad_(True)
    return peft_model


def _unwrapped_ties(model: Any) -> tuple[Any, dict[str, torch.Tensor], list[str], int]:
    """A tied model's base, its delta tensors by parameter name, the delta layers' names and their rank; a plain
    model comes back as it is, with nothing carried."""
    if not hasattr(model, "get_base_model"):
        return model, {}, [], 0
    ties = tie_record(model)
    if not ties:
        raise FoldGPTError("this model already carries a LoRA adapter (it was healed); heal the folder it came from")
    carried = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}
    base = model.unload()
    deltas = delta_module_names(base, adapter_for(base).layers_path, [child for _, child in ties["ties"]])
    return base, carried, deltas, int(ties["rank"])


def lora_targets(model: nn.Module, config: HealConfig) -> tuple[str, ...]:
    """The linear layers LoRA adapts: ``config.target_modules``, or every projection of the family's blocks."""
    if config.target_modules is not None:
        return config.target_modules
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return adapter_for(base).lora_targets
