"""LoRA adapters around frozen models, and the parameters that train with them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from foldgpt.arch.adapters import adapter_for, linear_layers_by_name
from foldgpt.train.modes import frozen_weights


@contextmanager
def compensating_lora(model: PreTrainedModel, rank: int, seed: int) -> Iterator[Any]:
    """LoRA adapters of ``rank`` on every projection of ``model``'s blocks while open (``GateConfig.lora_rank``), only
    they trainable; yields the peft tuner (None for ``rank == 0``, which changes nothing). On exit the adapters are
    unloaded and every weight's ``requires_grad`` restored, so the model is as before."""
    if rank == 0:
        yield None
        return
    from peft import LoraConfig  # noqa: PLC0415
    from peft.tuners.lora import LoraModel  # noqa: PLC0415
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    targets = adapter_for(model).lora_targets
    linear = linear_layers_by_name(model)
    had_peft_config = "peft_config" in vars(model)
    torch.manual_seed(seed)  # LoRA's A matrices are initialised at random
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), bias="none",  # type: ignore[arg-type]
                        fan_in_fan_out=isinstance(linear[targets[0]], Conv1D))
    with frozen_weights(model):
        tuner = LoraModel(model, config, "gates")  # marks only the adapters trainable
        try:
            yield tuner
        finally:
            tuner.unload()
            if not had_peft_config:
                vars(model).pop("peft_config", None)


@contextmanager
def adapters_off(lora: Any) -> Iterator[None]:
    """``compensating_lora``'s adapters switched off while open (the teacher is the model without them)."""
    if lora is None:
        yield
        return
    lora.disable_adapter_layers()
    try:
        yield
    finally:
        lora.enable_adapter_layers()


def norm_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """The weights of every block position's norms: the adapter's per-block norms plus any norm inside the block
    (``q_norm`` / ``k_norm`` of Qwen3 and Gemma 3), each Parameter once."""
    adapter = adapter_for(model)
    found: dict[int, nn.Parameter] = {}
    for block in adapter.layers(model):
        modules = list(adapter.block_norms(block))
        modules += [m for m in block.modules() if type(m).__name__.endswith("Norm") and not isinstance(m, nn.Linear)]
        for module in modules:
            for parameter in module.parameters():
                found.setdefault(id(parameter), parameter)
    return list(found.values())


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable Parameter by its (first) name, in a fixed order (the optimiser's and the checkpoint's)."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
