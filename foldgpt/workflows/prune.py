"""The ``prune`` workflow, top to bottom: calibration data -> block selection -> removal -> plain HF folder.

With ``granularity="sublayer"`` (gates only) the selection is of attention and MLP sub-layers: blocks with both
closed are removed, single branches are zeroed in the saved folder and recorded in its config (``foldgpt.sublayers``),
and the returned model has them replaced by weightless ``ZeroBranch``-es, as ``foldgpt.load`` gives it back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from foldgpt._version import __version__
from foldgpt.analysis.figures import plot_gate_history, plot_sublayer_gate_history
from foldgpt.arch.adapters import adapter_for
from foldgpt.core.lineage import in_original_numbering
from foldgpt.core.outputs import atomic_output_dir
from foldgpt.core.ranges import parse_ranges
from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel
from foldgpt.formats.plain import save_plain_model
from foldgpt.selection.base import Selection, select_blocks_with
from foldgpt.selection.config import GRANULARITIES, GateConfig, ProbeConfig, default_calibration
from foldgpt.selection.gates import select_by_gates_with, select_sublayers_by_gates_with
from foldgpt.selection.registry import METHODS, select_blocks
from foldgpt.surgery.budget import (
    RemovalTarget,
    blocks_to_remove,
    branch_flops_per_token,
    branch_parameters,
    model_flops_per_token,
    sublayer_budget,
)
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.sublayers import (
    BRANCHES,
    REMOVED_SUBLAYERS_KEY,
    check_sublayer_removal_supported,
    drop_removed_sublayers,
    refuse_removed_sublayers,
    zero_branch_output,
)
from foldgpt.train.parallel import is_main_process
from foldgpt.workflows.probe import choose_by_probe


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
    granularity: str = "block",
    blocks: Sequence[int] | None = None,
    probe: ProbeConfig | None = None,
) -> PruneResult:
    """Remove blocks from ``loaded.model`` in place with ``method``; save a plain HF folder to ``out`` if given.

    Give one target: ``remove`` blocks, ``remove_ratio`` of them, or keep ``target_params`` / ``target_flops`` of the
    model's parameters / FLOPs per token (see ``foldgpt.budget``). ``gate_config`` sets the hyper-parameters of
    ``method="gates"`` (defaults: ``GateConfig()``). ``granularity="sublayer"`` (gates only) gates and removes attention
    and MLP sub-layers, the target counted in sub-layers (see ``foldgpt.budget``).

    ``blocks`` removes exactly those blocks instead (method ``"given"``, no calibration data, no other target): to
    reproduce a set a paper or another tool reports, or to compare sets on equal terms.

    ``probe`` (gates, whole blocks) screens the ``screen`` sets nearest the gates' pick on held-out text; with ``sets >
    0`` it heals the ``sets`` best of them briefly and keeps the one that heals best, with ``sets == 0`` it keeps the
    best-screened one (``PRUNE_SCREEN``, the CLI's default); ``None`` keeps the gates' own pick
    (``foldgpt.importance.probe``). What it did is recorded under ``details["probe"]``.
    """
    if blocks is not None:
        if any(value is not None for value in (remove, remove_ratio, target_params, target_flops)) or granularity != "block":
            raise FoldGPTError("--blocks names the blocks to remove: give it without --remove, --remove-ratio, --target-params, "
                               "--target-flops and --granularity sublayer")
        method = "given"
    elif method not in METHODS:
        raise FoldGPTError(f"unknown method '{method}'; choose one of {', '.join(sorted(METHODS))}")
    if granularity not in GRANULARITIES:
        raise FoldGPTError(f"unknown granularity '{granularity}'; choose one of {', '.join(GRANULARITIES)}")
    if granularity == "sublayer" and method != "gates":
        raise FoldGPTError(f"--granularity sublayer needs --method gates (method '{method}' scores whole blocks)")
    if probe is not None and (method != "gates" or granularity != "block") and probe.sets > 0:
        raise FoldGPTError("--gate-probe-sets needs --method gates with whole blocks (it probes sets near the gates' pick)")
    if probe is not None and (probe.sets == probe.screen == 0 or method != "gates" or granularity != "block"):
        probe = None  # off, or a screen default that other methods do not have: the method's own set
    calibration = None if blocks is not None else calibration or default_calibration(method)
    model = loaded.model
    if getattr(model.config, "foldgpt_sharing", None) or hasattr(model, "get_base_model"):
        raise FoldGPTError(f"'{loaded.source}' is folded or healed; remove blocks first, then fold (prune the unfolded model)")
    refuse_removed_sublayers(model, "pruning")
    num_blocks = len(adapter_for(model).layers(model))
    target = RemovalTarget(remove=remove, remove_ratio=remove_ratio, target_params=target_params, target_flops=target_flops)
    if granularity == "sublayer":
        check_sublayer_removal_supported(model)
        costs, needed = sublayer_budget(model, target)
    elif blocks is None:
        n_remove = blocks_to_remove(model, target)
    parameters_before = count_parameters(model)
    flops_before = model_flops_per_token(model, target.flops_context)
    start = time.perf_counter()
    if calibration is None:  # blocks given
        selection = given_selection(list(blocks or ()), num_blocks)
        n_remove = len(selection.removed)
    else:
        windows = load_windows(loaded.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
        if granularity == "sublayer":
            select = select_sublayers_by_gates_with(gate_config or GateConfig(), costs, needed)
            selection = select_blocks_with(select, "gates", model, windows, 0, calibration.seed)
            n_remove = len(selection.removed)
        elif method == "gates" and gate_config is not None:
            selection = select_blocks_with(select_by_gates_with(gate_config), "gates", model, windows, n_remove, calibration.seed)
        else:
            selection = select_blocks(method, model, windows, n_remove, calibration.seed)
        if probe is not None:
            selection = probed_selection(loaded, selection, n_remove, probe)
    saved_sublayers = _remove(model, selection, num_blocks)
    parameters_after = count_parameters(model) - _branch_total(model, saved_sublayers, lambda block, branch: branch_parameters(model, block, branch))
    flops_after = model_flops_per_token(model, target.flops_context) - _branch_total(
        model, saved_sublayers, lambda block, branch: branch_flops_per_token(model, block, branch, target.flops_context))
    metadata = {
        "foldgpt_version": __version__,
        "stage": "prune",
        "source_model": loaded.source,
        "source_hub": loaded.hub,
        "method": method,
        "num_blocks_before": num_blocks,
        "num_blocks_after": num_blocks - n_remove,
        "removed": selection.removed,
        "removed_original": in_original_numbering(loaded.source, selection.removed, num_blocks),
        "scores": selection.scores,
        "details": selection.details,
        "calibration": None if calibration is None else vars(calibration),
        "parameters_before": parameters_before,
        "parameters_after": parameters_after,
        "target": {"blocks": selection.removed} if blocks is not None else {name: getattr(target, name) for name in target.given()},
        "flops_per_token_before": flops_before,
        "flops_per_token_after": flops_after,
        "flops_context": target.flops_context,
        "selection_seconds": selection.seconds,
        "total_seconds": time.perf_counter() - start,
    }
    if granularity == "sublayer":
        metadata.update(
            granularity="sublayer",
            removed_sublayers=selection.removed_sublayers,  # in the input's numbering, blocks that stay
            removed_sublayers_original={branch: in_original_numbering(loaded.source, blocks, num_blocks)
                                        for branch, blocks in selection.removed_sublayers.items()},
            removed_sublayers_saved=saved_sublayers,  # in the saved folder's numbering, as in its config
            sublayers_removed=sum(len(v) for v in selection.details["closed_sublayers"].values()),
            parameters_after_plain=count_parameters(model),  # the zeroed plain folder, every tensor kept
        )
    if out is not None and is_main_process():  # under torchrun / accelerate launch (gates) only rank 0 writes
        with atomic_output_dir(Path(out), overwrite) as folder:
            save_plain_model(model, loaded.tokenizer, folder, metadata)
            if "gate_history" in selection.details:
                plot = plot_sublayer_gate_history if granularity == "sublayer" else plot_gate_history
                plot(selection.details["gate_history"], folder / "gates.png", title=Path(loaded.source).name,
                     run_steps=selection.details["hyperparameters"]["steps"])
    drop_removed_sublayers(model)  # in memory as foldgpt.load gives the folder back: removed branches hold no weights
    return PruneResult(selection=selection, loaded=loaded, metadata=metadata)


def probed_selection(loaded: LoadedModel, selection: Selection, n_remove: int, probe: ProbeConfig) -> Selection:
    """``selection`` with the set its screen / healing probes chose, their time added and their record under
    ``details["probe"]`` (``loaded`` is the dense model: nothing has been removed yet)."""
    if selection.scores is None:
        raise FoldGPTError(f"method '{selection.method}' gives no per-block scores to draw probe candidates from")
    start = time.perf_counter()
    outcome = choose_by_probe(loaded, selection.scores, n_remove, probe)
    seconds = time.perf_counter() - start
    details = {**selection.details, "probe": {**outcome, "seconds": seconds}}
    return replace(selection, removed=outcome["chosen"], details=details, seconds=selection.seconds + seconds)


def _remove(model, selection: Selection, num_blocks: int) -> dict[str, list[int]]:
    """Zero the removed branches of kept blocks, remove the blocks, and record the branches in the config (new
    numbering); returns that record (empty lists when no single branch was removed)."""
    for branch, blocks in selection.removed_sublayers.items():
        for block in blocks:
            zero_branch_output(model, block, branch)
    remove_blocks(model, selection.removed)
    kept = [i for i in range(num_blocks) if i not in set(selection.removed)]
    saved = {branch: [kept.index(b) for b in selection.removed_sublayers.get(branch, [])] for branch in BRANCHES}
    if any(saved.values()):
        setattr(model.config, REMOVED_SUBLAYERS_KEY, saved)
    return saved


def _branch_total(model, saved: dict[str, list[int]], cost) -> int:
    layers = adapter_for(model).layers(model)
    return sum(cost(layers[index], branch) for branch, blocks in saved.items() for index in blocks)


def parse_blocks(text: str) -> list[int]:
    """Block indices from ``"4,5,14,26"`` or ``"13-18"`` or a mix (``--blocks``)."""
    return [block for blocks in parse_ranges(text, "--blocks") for block in blocks]


def given_selection(blocks: list[int], num_blocks: int) -> Selection:
    """``prune(blocks=...)``'s selection: exactly ``blocks`` (input numbering), checked against the model's depth."""
    wrong = [block for block in blocks if not 0 <= block < num_blocks]
    if wrong or len(set(blocks)) != len(blocks) or not 0 < len(blocks) < num_blocks:
        raise FoldGPTError(f"--blocks {','.join(map(str, blocks))}: give distinct blocks between 0 and {num_blocks - 1}, "
                           f"at least one and fewer than all {num_blocks}")
    return Selection(method="given", removed=sorted(blocks))


