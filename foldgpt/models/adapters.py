"""Architecture adapters: where a decoder-only model keeps its blocks, and what is inside one.

One small frozen dataclass per family, as SliceGPT's model adapters do. The rest of foldgpt never touches an
architecture's attribute names directly: it asks the adapter. Adding a family is adding one entry to ``ADAPTERS``
(see docs/adding-an-architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from foldgpt.errors import FoldGPTError


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names of the parts of one decoder-only family, relative to the ``*ForCausalLM`` model."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attention_output: str = "o_proj"
    mlp_output: str = "down_proj"

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


_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter("Llama", ("llama",), norms=_LLAMA_NORMS),
    ArchitectureAdapter("Mistral", ("mistral",), norms=_LLAMA_NORMS),
    ArchitectureAdapter("Qwen2", ("qwen2",), norms=_LLAMA_NORMS),
    ArchitectureAdapter("Qwen3", ("qwen3",), norms=_LLAMA_NORMS),
    ArchitectureAdapter("Gemma2", ("gemma2",), norms=_GEMMA_NORMS),
    ArchitectureAdapter("Gemma3", ("gemma3_text",), norms=_GEMMA_NORMS),
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` foldgpt has an adapter for."""
    return [model_type for adapter in ADAPTERS for model_type in adapter.model_types]


def adapter_for(model_or_config: PreTrainedModel | PretrainedConfig) -> ArchitectureAdapter:
    """The adapter of a model or config, or a one-line error listing what is supported."""
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    hint = ""
    if model_type == "gemma3":
        hint = " (for Gemma 3, use the text-only checkpoint / Gemma3ForCausalLM, model_type 'gemma3_text')"
    raise FoldGPTError(
        f"architecture '{model_type}' is not supported{hint}; supported model types: "
        f"{', '.join(supported_model_types())} (docs/adding-an-architecture.md explains how to add one)"
    )
