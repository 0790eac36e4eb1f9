"""Writing a healed model: the compact folder with its adapters, and optionally a plain export."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from foldgpt.core.outputs import atomic_output_dir
from foldgpt.errors import FoldGPTError
from foldgpt.formats.compact import ADAPTER_DIR, save_compact
from foldgpt.formats.loading import LoadedModel, dtype_name, load_model
from foldgpt.formats.plain import export_plain
from foldgpt.healing.config import HealConfig
from foldgpt.healing.lora import add_lora


def save_healed(loaded: LoadedModel, out: Path, metadata: dict, overwrite: bool = False, plain: bool = False) -> LoadedModel:
    """Write a healed compact folder (and, with ``plain``, ``out/plain``); returns the model loaded back from it.

    Layout: ``adapter/`` from ``peft_model.save_pretrained``, then the base model with LoRA removed (``unload``, not
    merged: the shared base stays shared) and the trained norms through ``save_compact``.
    """

    model = loaded.model
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with atomic_output_dir(out, overwrite) as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks for transformers' deprecated is_gradient_checkpointing
        model.save_pretrained(str(folder / ADAPTER_DIR))
        base = model.unload()
        base.requires_grad_(False)
        save_compact(base, loaded.tokenizer, folder, metadata)
        if plain:

            export_plain(load_model(str(folder), dtype=dtype_name(dtype), device=str(device)), folder / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load_model(str(out), dtype=dtype_name(dtype), device=str(device))


def rebuilt_on_cpu(student: LoadedModel, config: HealConfig, trainable: dict[str, torch.Tensor], dtype: torch.dtype) -> LoadedModel:
    """The student reloaded from its folder on the CPU with LoRA and the trained tensors (after FSDP sharded it)."""

    fresh = load_model(student.source, dtype=dtype_name(dtype), device="cpu")
    model = add_lora(fresh.model, config)
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if parameters[name].requires_grad and name not in trainable]
    if missing:
        raise FoldGPTError(f"the gathered FSDP state lacks {len(missing)} trained tensors (e.g. {missing[0]}); cannot save")
    with torch.no_grad():
        for name, value in trainable.items():
            parameters[name].copy_(value)
    return LoadedModel(model=model, tokenizer=fresh.tokenizer, source=student.source)

