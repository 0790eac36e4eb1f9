"""The trainable part of healing: one LoRA adapter per block position, plus the per-block norms."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from foldgpt.arch.adapters import adapter_for, linear_layers_by_name
from foldgpt.errors import FoldGPTError
from foldgpt.healing.config import HealConfig
from foldgpt.train.lora import norm_parameters


def add_lora(model: PreTrainedModel, config: HealConfig) -> nn.Module:
    """Wrap ``model`` in place with one LoRA adapter per targeted linear layer of every block position; base frozen,
    norms trainable (``config.train_norms``). Returns the peft model."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

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
        target_modules=list(targets),
        fan_in_fan_out=isinstance(linear[targets[0]], Conv1D),  # GPT-2's Conv1D stores its weight transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft still asks transformers for the deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    if config.train_norms:
        for parameter in norm_parameters(model):
            parameter.requires_grad_(True)
    return peft_model


def lora_targets(model: nn.Module, config: HealConfig) -> tuple[str, ...]:
    """The linear layers LoRA adapts: ``config.target_modules``, or every projection of the family's blocks."""
    if config.target_modules is not None:
        return config.target_modules
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return adapter_for(base).lora_targets
