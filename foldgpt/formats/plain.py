"""Vanilla Hugging Face folders: saving a pruned model, and exporting a compact (folded or healed) one."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foldgpt.core.lineage import origin_metadata
from foldgpt.core.outputs import METADATA_FILE, atomic_output_dir
from foldgpt.formats.compact import WEIGHTS_FILE
from foldgpt.formats.loading import LoadedModel
from foldgpt.surgery.sharing import parameter_report, unshare
from foldgpt.surgery.sublayers import refuse_removed_sublayers


def save_plain_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, metadata: dict) -> None:
    """A vanilla Hugging Face folder (config, safetensors, tokenizer) plus ``foldgpt.json``."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def merged_model(loaded: LoadedModel, purpose: str = "exporting (its pruned folder is already a plain folder)") -> PreTrainedModel:
    """``loaded``'s model as a plain one, in place: shared weights copied per position, a LoRA adapter merged per
    position (every exporter starts from this, so a folded or healed folder exports the logits it computes)."""
    model = loaded.model
    refuse_removed_sublayers(model, purpose)
    unshare(model)  # before merging: merging into a shared base would add one position's delta to the whole group
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    loaded.model = model
    return model


def export_plain(loaded: LoadedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``loaded`` as a vanilla HF folder: shared weights copied per position, a LoRA adapter merged per position."""
    model = merged_model(loaded)
    metadata = {
        **origin_metadata("export", loaded.source, loaded.hub),
        "parameters": parameter_report(model).to_dict(),
    }
    with atomic_output_dir(Path(out), overwrite) as folder:
        save_plain_model(model, loaded.tokenizer, folder, metadata)
    loaded.model = model
    return Path(out)


def folder_weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a model folder (compact or plain); tokenizer and JSON files excluded."""
    folder = Path(folder)
    files = [folder / WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    files += sorted((folder / "adapter").glob("*.safetensors"))
    return sum(path.stat().st_size for path in files)
