"""Architecture adapters: where a decoder-only model keeps its blocks, and what is inside one.

One small frozen dataclass per family, as SliceGPT's model adapters do. The rest of foldgpt never touches an
architecture's attribute names directly: it asks the adapter. Adding a family is adding one entry to ``ADAPTERS``
(see docs/adding-an-architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from foldgpt.errors import FoldGPTError

LINEAR_TYPES = (nn.Linear, Conv1D)
"""The projection layers inside a block: ``nn.Linear``, and GPT-2's ``Conv1D`` (the same map, weight stored transposed)."""


def linear_layers_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """One projection layer of ``model`` per attribute name (``q_proj``, ``c_attn``, ...): what LoRA's
    ``target_modules`` name, and whether they are ``Conv1D`` (peft's ``fan_in_fan_out``)."""
    return {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)}

_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names of the parts of one decoder-only family, relative to the ``*ForCausalLM`` model.

    ``attention`` and ``mlp`` are sub-modules of a block (``mlp=None``: the MLP's layers sit on the block itself, as
    OPT's ``fc1``/``fc2``); ``attention_output`` / ``mlp_output`` are their output projections, relative to them.
    ``lora_targets`` names every projection of a block (healing's default LoRA targets). ``refused`` lists config
    settings (attribute, value, reason) of variants that foldgpt cannot compress exactly.

    Sub-layer gates: ``attention_update`` / ``mlp_update`` name the module (relative to the block) whose output is
    exactly that branch's residual update, the tensor added to the stream: the attention / MLP for Llama-like
    families, GPT-2 and GPT-NeoX, OPT's ``fc2``, Gemma 2/3's ``post_attention_layernorm`` /
    ``post_feedforward_layernorm`` (the update passes through them; an RMSNorm is scale-invariant, so a gate before
    it would do nothing). ``mlp_parts`` names the MLP's modules on the block when ``mlp`` is None (OPT's ``fc1``,
    ``fc2``): what a removed MLP is replaced by ``ZeroBranch``-es (``foldgpt.sublayers``).
    """

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attention: str = "self_attn"
    mlp: str | None = "mlp"
    norms: tuple[str, ...] = _LLAMA_NORMS
    attention_output: str = "o_proj"
    mlp_output: str = "down_proj"
    lora_targets: tuple[str, ...] = _LLAMA_PROJECTIONS
    refused: tuple[tuple[str, object, str], ...] = ()
    attention_update: str = "self_attn"
    mlp_update: str = "mlp"
    mlp_parts: tuple[str, ...] = ()

    def parent_and_name(self, model: nn.Module) -> tuple[nn.Module, str]:
        """The module that owns the layer list, and the list's attribute name on it."""
        *parents, name = self.layers_path.split(".")
        owner = model
        for part in parents:
            owner = getattr(owner, part)
        return owner, name

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        owner, name = self.parent_and_name(model)
        layers = getattr(owner, name)
        if not isinstance(layers, nn.ModuleList):
            raise FoldGPTError(f"expected a ModuleList at '{self.layers_path}', found {type(layers).__name__}")
        return layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the decoder blocks (used by removal)."""
        owner, name = self.parent_and_name(model)
        setattr(owner, name, layers)

    def block_norms(self, block: nn.Module) -> list[nn.Module]:
        """The per-block normalisation modules (two for Llama, four for Gemma 2/3)."""
        return [getattr(block, name) for name in self.norms]

    def attention_module(self, block: nn.Module) -> nn.Module:
        """The block's attention (it carries the ``layer_idx`` of the KV cache)."""
        return block.get_submodule(self.attention)

    def attention_output_layer(self, block: nn.Module) -> nn.Module:
        """The attention's output projection (``o_proj``), whose output is added to the residual stream."""
        return block.get_submodule(f"{self.attention}.{self.attention_output}")

    @property
    def mlp_output_name(self) -> str:
        """The path of the MLP's output projection relative to a block (``mlp.down_proj``, OPT's ``fc2``)."""
        return self.mlp_output if self.mlp is None else f"{self.mlp}.{self.mlp_output}"

    def mlp_output_layer(self, block: nn.Module) -> nn.Module:
        """The MLP's output projection (``down_proj``), whose output is added to the residual stream."""
        return block.get_submodule(self.mlp_output_name)

    def branch_update(self, block: nn.Module, branch: str) -> nn.Module:
        """The module whose output is the residual update of ``branch`` (``"attention"`` or ``"mlp"``) of ``block``."""
        return block.get_submodule(self.attention_update if branch == "attention" else self.mlp_update)

    def branch_parts(self, branch: str) -> tuple[str, ...]:
        """The modules (relative to a block) that make up ``branch``: its weights and FLOPs."""
        if branch == "attention":
            return (self.attention,)
        return (self.mlp,) if self.mlp is not None else self.mlp_parts

    def check_config(self, config: PretrainedConfig) -> None:
        """Refuse a variant of the family listed in ``refused``, with the reason."""
        for attribute, value, reason in self.refused:
            if getattr(config, attribute, None) == value:
                raise FoldGPTError(f"{self.family} models with {attribute}={value} are not supported: {reason}")


_GEMMA_UPDATES: dict[str, Any] = {"attention_update": "post_attention_layernorm", "mlp_update": "post_feedforward_layernorm"}
_GPT2_REFUSED = (
    ("scale_attn_by_inverse_layer_idx", True, "each block scales its attention by its position, so a kept block would "
     "compute something else once blocks before it are removed"),
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter("Llama", ("llama",)),
    ArchitectureAdapter("Mistral", ("mistral",)),
    ArchitectureAdapter("Qwen2", ("qwen2",)),
    ArchitectureAdapter("Qwen3", ("qwen3",)),
    ArchitectureAdapter("Gemma2", ("gemma2",), norms=_GEMMA_NORMS, **_GEMMA_UPDATES),
    ArchitectureAdapter("Gemma3", ("gemma3_text",), norms=_GEMMA_NORMS, **_GEMMA_UPDATES),
    ArchitectureAdapter("Phi3", ("phi3",), lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    ArchitectureAdapter(
        "OPT", ("opt",), layers_path="model.decoder.layers", mlp=None, norms=("self_attn_layer_norm", "final_layer_norm"),
        attention_output="out_proj", mlp_output="fc2", lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        mlp_update="fc2", mlp_parts=("fc1", "fc2"),
    ),
    ArchitectureAdapter(
        "GPT2", ("gpt2",), layers_path="transformer.h", attention="attn", norms=("ln_1", "ln_2"),
        attention_output="c_proj", mlp_output="c_proj", lora_targets=("c_attn", "c_proj", "c_fc"), refused=_GPT2_REFUSED,
        attention_update="attn",
    ),
    ArchitectureAdapter(
        "GPTNeoX", ("gpt_neox",), layers_path="gpt_neox.layers", attention="attention", attention_output="dense",
        mlp_output="dense_4h_to_h", lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        attention_update="attention",
    ),
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` foldgpt has an adapter for."""
    return [model_type for adapter in ADAPTERS for model_type in adapter.model_types]


def adapter_for(model_or_config: nn.Module | PretrainedConfig) -> ArchitectureAdapter:
    """The adapter of a model (any module with a ``config``) or of a config, or a one-line error listing what is supported."""
    config: Any = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            adapter.check_config(config)
            return adapter
    hint = ""
    if model_type == "gemma3":
        hint = " (for Gemma 3, use the text-only checkpoint / Gemma3ForCausalLM, model_type 'gemma3_text')"
    raise FoldGPTError(
        f"architecture '{model_type}' is not supported{hint}; supported model types: "
        f"{', '.join(supported_model_types())} (docs/adding-an-architecture.md explains how to add one)"
    )


def hidden_of(value: object) -> torch.Tensor:
    """The hidden-state tensor of a block's input or output (a tensor, or the first item of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(value).__name__}")

