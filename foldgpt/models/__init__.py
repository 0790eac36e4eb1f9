"""Loading, saving and describing models: the only place that knows about architectures."""

from foldgpt.models.adapters import ArchitectureAdapter, adapter_for, supported_model_types
from foldgpt.models.loading import load_model, resolve_model_path

__all__ = ["ArchitectureAdapter", "adapter_for", "load_model", "resolve_model_path", "supported_model_types"]
