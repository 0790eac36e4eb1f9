"""Module modes for training frozen models: frozen weights, eval mode, activation checkpointing, autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import PreTrainedModel

from foldgpt.arch.adapters import adapter_for


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """No model weight takes gradients while open; each weight's own ``requires_grad`` comes back after."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off, so the teacher and the gated student are the same network up to the gates."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def activation_checkpointing(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Recompute block activations in the backward pass instead of storing them (for long windows on big models).

    Hugging Face checkpoints a decoder layer only when ``layer.training`` is set, so that one flag is set on each
    layer (not ``.train()``, which would also turn on dropout inside it). Non-reentrant checkpointing needs no input
    that requires grad, so the embedding hook Hugging Face adds for that is removed at once (it would only add a
    backward pass through block 0). Everything is undone on exit, unless checkpointing was already on.
    """
    if not enabled or model.is_activation_checkpointing:
        yield
        return
    layers = adapter_for(model).layers(model)
    had_input_grad_hooks = bool(getattr(model, "_require_grads_hooks", None))
    model.activation_checkpointing_enable({"use_reentrant": False})
    if not had_input_grad_hooks:
        model.disable_input_require_grads()
    modes = [layer.training for layer in layers]
    rates = [_functional_dropout_rates(layer) for layer in layers]
    for layer, layer_rates in zip(layers, rates):
        layer.training = True
        for name in layer_rates:
            setattr(layer, name, 0.0)
    try:
        yield
    finally:
        for layer, mode, layer_rates in zip(layers, modes, rates):
            layer.training = mode
            for name, rate in layer_rates.items():
                setattr(layer, name, rate)
        model.activation_checkpointing_disable()


def _functional_dropout_rates(layer: nn.Module) -> dict[str, float]:
    """The layer's own float dropout rates (OPT's ``self.dropout``, applied with ``F.dropout(training=self.training)``).

    Setting ``layer.training`` for checkpointing would switch those on, unlike ``nn.Dropout`` sub-modules, which keep
    their eval mode; :func:`activation_checkpointing` zeroes them while it is active.
    """
    return {name: value for name, value in vars(layer).items()
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool) and value > 0}


@contextmanager
def healing_mode(model: nn.Module) -> Iterator[None]:
    """The mode healing trains in: the base model in eval mode (its dropout off), LoRA's own dropout on.

    The base weights are frozen and the student is fitted to the teacher, which runs in eval mode: the dropout of
    configs that have one (GPT-2's ``resid_pdrop`` / ``embd_pdrop`` / ``attn_pdrop``, OPT's ``dropout`` /
    ``attention_dropout``, ...) would only add noise to that comparison, as in gate training's ``eval_mode``.
    ``HealConfig.lora_dropout`` is a separate, intended regulariser of the adapters' inputs: peft implements it as
    ``nn.Dropout`` modules in each LoRA layer's ``lora_dropout`` ModuleDict (``nn.Identity`` when it is 0), which
    ``model.eval()`` switches off too, so exactly those modules are put back in train mode. Every module's previous
    mode is restored on exit. Enter it before ``activation_checkpointing``, which sets the decoder layers' own
    ``training`` flag (what Hugging Face checks before checkpointing a layer).
    """
    modes = module_modes(model)
    model.eval()
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, nn.ModuleDict):
            dropout.train()
    try:
        yield
    finally:
        restore_modes(modes)


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module of ``model`` with its ``training`` flag, for ``restore_modes``."""
    return [(module, module.training) for module in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Set each module's own ``training`` flag back (not ``.train()``, which would set its children's too)."""
    for module, training in modes:
        module.training = training


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the model's device (CPU or GPU), or nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()
