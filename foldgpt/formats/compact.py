"""The compact format: a folded model on disk with every shared tensor stored once.

A compact folder holds ``config.json`` (the model's own config plus the group map under ``foldgpt_sharing``),
``model.compact.safetensors`` (each distinct tensor once; the names under which it is reused are listed in the file's
metadata as aliases), the tokenizer, ``foldgpt.json``, and, after healing, ``adapter/`` (a peft LoRA adapter with one
adapter per block position). Vanilla ``save_pretrained`` cannot write this: safetensors refuses tensors that share
memory and transformers silently drops the "duplicates", which then load back random (docs/design.md, "Pitfalls known from peers").

Loading builds the model with empty (meta) parameters, assigns the stored tensors, and re-points every alias at its
Parameter, so the process's memory grows by the unique bytes, not by the materialised model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foldgpt.errors import FoldGPTError
from foldgpt.surgery.sharing import apply_plan, sharing_plan

WEIGHTS_FILE = "model.compact.safetensors"
ADAPTER_DIR = "adapter"
ALIASES_KEY = "foldgpt_aliases"


def is_compact_folder(folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_compact``."""
    return (Path(folder) / WEIGHTS_FILE).is_file()


def unique_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct parameter or persistent buffer once, by its first name; and ``{other name: stored name}``."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first_name:
            aliases[name] = first_name[id(parameter)]
        else:
            first_name[id(parameter)] = name
            stored[name] = parameter.detach().contiguous()
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name in persistent and name not in stored:
            stored[name] = buffer.detach().contiguous()
    return stored, aliases


def save_compact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, metadata: dict) -> None:
    """Write ``model`` (a plain HF model, folded or not) as a compact folder into the existing folder ``folder``."""
    folder = Path(folder)
    stored, aliases = unique_tensors(model)
    save_file(stored, str(folder / WEIGHTS_FILE), metadata={"format": "pt", ALIASES_KEY: json.dumps(aliases)})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "foldgpt.json").write_text(json.dumps(metadata, indent=2) + "\n")


def load_compact(folder: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Rebuild a folded model from a compact folder, allocating only the stored (unique) tensors."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config)
    tensors, aliases = _read_weights(folder / WEIGHTS_FILE)
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise FoldGPTError(f"{folder / WEIGHTS_FILE} has tensors this config does not use (e.g. '{result.unexpected_keys[0]}'); "
                           "the folder's config.json and weights do not belong together")
    for alias, target in aliases.items():
        _set_parameter(model, alias, model.get_parameter(target))
    plan = sharing_plan(model)
    if plan is not None:
        apply_plan(model, plan)
    empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise FoldGPTError(f"{folder / WEIGHTS_FILE} lacks '{empty[0]}' (and {len(empty) - 1} more); re-create the folder with foldgpt fold")
    return model.eval()


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get(ALIASES_KEY, "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise FoldGPTError(f"cannot read {path}: {error}; the file is corrupt or truncated, re-create it with foldgpt fold") from error
    return tensors, aliases


def _set_parameter(model: torch.nn.Module, name: str, parameter: torch.nn.Parameter) -> None:
    owner_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attribute, parameter)


def attach_adapter(model: PreTrainedModel, folder: Path) -> torch.nn.Module:
    """Wrap ``model`` with the healed LoRA adapter in ``folder/adapter`` if there is one (one adapter per position)."""
    adapter = Path(folder) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return model
    from peft import PeftModel  # noqa: PLC0415  (peft is only needed for healed folders)

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise FoldGPTError(f"cannot load the LoRA adapter in {adapter}: {str(error).splitlines()[0]}") from error

