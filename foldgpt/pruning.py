"""The ``prune`` workflow, top to bottom: calibration data -> block selection -> removal -> plain HF folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from foldgpt import __version__
from foldgpt.errors import FoldGPTError
from foldgpt.artifacts import atomic_output_dir, read_metadata, save_plain_model
from foldgpt.data import CalibrationConfig, load_windows
from foldgpt.importance import METHODS, Selection, select_blocks
from foldgpt.importance.base import select_blocks_with
from foldgpt.importance.gates import GateConfig, select_by_gates_with
from foldgpt.plotting import plot_gate_history
from foldgpt.models import adapter_for
from foldgpt.models.loading import LoadedModel
from foldgpt.budget import RemovalTarget, blocks_to_remove, model_flops_per_token
from foldgpt.removal import count_parameters, remove_blocks


@dataclass
class PruneResult:
    """What ``prune`` did: the selection, the model after removal, and the metadata written to ``foldgpt.json``."""

    selection: Selection
    loaded: LoadedModel
    metadata: dict


def prune(
    loaded: LoadedModel,
    method: str = "bi",
    remove: int | None = None,
    remove_ratio: float | None = None,
    calibration: CalibrationConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    gate_config: GateConfig | None = None,
    target_params: float | None = None,
    target_flops: float | None = None,
) -> PruneResult:
    """Remove blocks from ``loaded.model`` in place with ``method``; save a plain HF folder to ``out`` if given.

    Give one target: ``remove`` blocks, ``remove_ratio`` of them, or keep ``target_params`` / ``target_flops`` of the
    model's parameters / FLOPs per token (see ``foldgpt.budget``). ``gate_config`` sets the hyper-parameters of
    ``method="gates"`` (defaults: ``GateConfig()``).
    """
    if method not in METHODS:
        raise FoldGPTError(f"unknown method '{method}'; choose one of {', '.join(sorted(METHODS))}")
    calibration = calibration or CalibrationConfig()
    model = loaded.model
    if getattr(model.config, "foldgpt_sharing", None) or hasattr(model, "get_base_model"):
        raise FoldGPTError(f"'{loaded.source}' is folded or healed; remove blocks first, then fold (prune the unfolded model)")
    num_blocks = len(adapter_for(model).layers(model))
    target = RemovalTarget(remove=remove, remove_ratio=remove_ratio, target_params=target_params, target_flops=target_flops)
    n_remove = blocks_to_remove(model, target)
    parameters_before = count_parameters(model)
    flops_before = model_flops_per_token(model, target.flops_context)
    start = time.perf_counter()
    windows = load_windows(loaded.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    if method == "gates" and gate_config is not None:
        selection = select_blocks_with(select_by_gates_with(gate_config), "gates", model, windows, n_remove, calibration.seed)
    else:
        selection = select_blocks(method, model, windows, n_remove, calibration.seed)
    remove_blocks(model, selection.removed)
    metadata = {
        "foldgpt_version": __version__,
        "stage": "prune",
        "source_model": loaded.source,
        "method": method,
        "num_blocks_before": num_blocks,
        "num_blocks_after": num_blocks - n_remove,
        "removed": selection.removed,
        "removed_original": _in_original_numbering(loaded.source, selection.removed, num_blocks),
        "scores": selection.scores,
        "details": selection.details,
        "calibration": vars(calibration),
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(model),
        "target": {name: getattr(target, name) for name in target.given()},
        "flops_per_token_before": flops_before,
        "flops_per_token_after": model_flops_per_token(model, target.flops_context),
        "flops_context": target.flops_context,
        "selection_seconds": selection.seconds,
        "total_seconds": time.perf_counter() - start,
    }
    if out is not None:
        with atomic_output_dir(Path(out), overwrite) as folder:
            save_plain_model(model, loaded.tokenizer, folder, metadata)
            if "gate_history" in selection.details:
                plot_gate_history(selection.details["gate_history"], folder / "gates.png", title=Path(loaded.source).name)
    return PruneResult(selection=selection, loaded=loaded, metadata=metadata)


def _in_original_numbering(source: str, removed: list[int], num_blocks: int) -> list[int]:
    """Map indices of an already-pruned model back to its original model's blocks (via its ``foldgpt.json``)."""
    previous = read_metadata(source)
    if "removed_original" not in previous:
        return removed
    original_depth = previous["num_blocks_before"]
    removed_before = set(previous["removed_original"])
    kept_original = [i for i in range(original_depth) if i not in removed_before]
    if len(kept_original) != num_blocks:
        return removed
    return [kept_original[i] for i in removed]
