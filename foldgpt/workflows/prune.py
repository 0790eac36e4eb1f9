"""The ``prune`` workflow, top to bottom: calibration data -> block selection -> removal -> plain HF folder.

With ``granularity="sublayer"`` (gates only) the selection is of attention and MLP sub-layers: blocks with both
closed are removed, single branches are zeroed in the saved folder and recorded in its config (``foldgpt.sublayers``),
and the returned model has them replaced by weightless ``ZeroBranch``-es, as ``foldgpt.load`` gives it back.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from foldgpt.analysis.figures import plot_gate_history, plot_sublayer_gate_history
from foldgpt.arch.adapters import adapter_for
from foldgpt.core.lineage import in_original_numbering
from foldgpt.core.outputs import atomic_output_dir
from foldgpt.core.ranges import parse_ranges
from foldgpt.data.config import CalibrationConfig
from foldgpt.data.text import load_text
from foldgpt.data.windows import calibration_starts, calibration_windows, load_windows, tokenize, windows_avoiding
from foldgpt.errors import FoldGPTError
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.formats.loading import LoadedModel
from foldgpt.formats.plain import save_plain_model
from foldgpt.selection.base import Selection, select_blocks_with
from foldgpt.selection.candidates import polarization
from foldgpt.selection.config import GRANULARITIES, GateConfig, ProbeConfig, default_calibration
from foldgpt.selection.gates import select_by_gates_with, select_sublayers_by_gates_with
from foldgpt.selection.registry import METHODS, select_blocks
from foldgpt.surgery.budget import RemovalTarget, blocks_to_remove, sublayer_budget
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.replacement import check_replaceable_family
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
from foldgpt.workflows.prune_metadata import model_cost, prune_metadata
from foldgpt.workflows.replace import carrier_weights, held_out_check, replace_removed, with_saved_carriers


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
    replacement: ReplacementConfig | None = None,
) -> PruneResult:
    """Remove blocks from ``loaded.model`` in place with ``method``; save a plain HF folder to ``out`` if given.

    Give one target: ``remove`` blocks, ``remove_ratio`` of them, or keep ``target_params`` / ``target_flops`` of the
    model's parameters / FLOPs per token (see ``foldgpt.surgery.budget``). ``gate_config`` sets the hyper-parameters of
    ``method="gates"`` (defaults: ``GateConfig()``). ``granularity="sublayer"`` (gates only) gates and removes attention
    and MLP sub-layers, the target counted in sub-layers (see ``foldgpt.surgery.budget``).

    ``blocks`` removes exactly those blocks instead (method ``"given"``, no calibration data, no other target): to
    reproduce a set a paper or another tool reports, or to compare sets on equal terms.

    ``probe`` (gates, whole blocks) screens the ``screen`` sets nearest the gates' pick on held-out text; with ``sets >
    0`` it heals the ``sets`` best of them briefly and keeps the one that heals best, with ``sets == 0`` it keeps the
    best-screened one (``PRUNE_SCREEN``, the CLI's default); ``None`` keeps the gates' own pick
    (``foldgpt.workflows.probe``). What it did is recorded under ``details["probe"]``.

    ``replacement`` (``ReplacementConfig("linear")``) replaces each removed span by a linear map fitted on the
    calibration windows and folded into the kept block before it (``foldgpt.workflows.replace``); its fit is recorded
    under ``replacement``.
    """
    target = RemovalTarget(remove=remove, remove_ratio=remove_ratio, target_params=target_params, target_flops=target_flops)
    method = checked_method(method, granularity, blocks, target)
    probe = effective_probe(probe, method, granularity)
    replaces = replacement is not None and replacement.replace != "none"
    calibration = calibration or default_calibration(method) if blocks is None or replaces else None
    model = loaded.model
    check_prunable(loaded)
    if replaces:
        check_replacement_possible(model, granularity)
    num_blocks = len(adapter_for(model).layers(model))
    budget = removal_budget(model, target, granularity, given=blocks is not None)
    before = model_cost(model, target.flops_context)
    start = time.perf_counter()
    if blocks is not None:
        selection = given_selection(list(blocks), num_blocks)
    else:
        assert calibration is not None  # every method but the given blocks calibrates
        selection = select_for_pruning(loaded, method, granularity, budget, calibration, gate_config, probe)
    n_remove = budget.n_remove if budget.n_remove is not None else len(selection.removed)
    extra = None
    if replaces:
        assert replacement is not None and calibration is not None
        extra = {"replacement": replace_selection(loaded, selection, calibration, replacement, num_blocks)}
    saved_sublayers = remove_selection(model, selection, num_blocks)
    after = model_cost(model, target.flops_context, saved_sublayers)
    if granularity == "sublayer":
        extra = sublayer_metadata(loaded.source, selection, num_blocks, saved_sublayers, model)
    metadata = prune_metadata(source=loaded.source, method=method, selection=selection, num_blocks=num_blocks,
                              n_remove=n_remove, calibration=calibration, target=target, before=before, after=after,
                              started=start, given_blocks=blocks is not None, extra=extra)
    if out is not None and is_main_process():  # under torchrun / accelerate launch (gates) only rank 0 writes
        write_pruned(loaded, metadata, selection, granularity, Path(out), overwrite)
    drop_removed_sublayers(model)  # in memory as foldgpt.load gives the folder back: removed branches hold no weights
    return PruneResult(selection=selection, loaded=loaded, metadata=metadata)


def check_replacement_possible(model: PreTrainedModel, granularity: str) -> None:
    """Refuse ``--replace linear`` before any selection runs where it could not be folded (spans are checked later)."""
    if granularity != "block":
        raise FoldGPTError("--replace linear replaces removed whole blocks; drop --granularity sublayer")
    check_replaceable_family(model.config)


def replace_selection(loaded: LoadedModel, selection: Selection, calibration: CalibrationConfig,
                      replacement: ReplacementConfig, num_blocks: int) -> dict:
    """Fit and fold the maps of ``selection``'s spans into the dense model (before removal), then keep them only if
    they lower held-out perplexity (``held_out_check``); the metadata record, with each carrier's index in the saved
    folder too."""
    tokens = tokenize(loaded.tokenizer, load_text(calibration.data, "calibration"))
    windows = calibration_windows(tokens, replacement.nsamples, replacement.seqlen, calibration.seed)
    original = carrier_weights(loaded.model, selection.removed)
    report, _ = replace_removed(ResidentBlocks(loaded.model), windows, selection.removed, replacement)
    if replacement.check_tokens:
        avoid = [(start, start + seqlen) for count, seqlen in ((replacement.nsamples, replacement.seqlen),
                                                                (calibration.nsamples, calibration.seqlen))
                 for start in calibration_starts(len(tokens), count, seqlen, calibration.seed)]
        held_out = windows_avoiding(tokens, replacement.seqlen, replacement.check_tokens, avoid)
        report["check"] = held_out_check(loaded.model, selection.removed, original, held_out)
    return with_saved_carriers(report, selection.removed, num_blocks)


def checked_method(method: str, granularity: str, blocks: Sequence[int] | None, target: RemovalTarget) -> str:
    """The method ``prune`` runs (``"given"`` with ``blocks``); refuses unknown names and combinations it cannot do."""
    if blocks is not None:
        if target.given() or granularity != "block":
            raise FoldGPTError("--blocks names the blocks to remove: give it without --remove, --remove-ratio, --target-params, "
                               "--target-flops and --granularity sublayer")
        method = "given"
    elif method not in METHODS:
        raise FoldGPTError(f"unknown method '{method}'; choose one of {', '.join(sorted(METHODS))}")
    if granularity not in GRANULARITIES:
        raise FoldGPTError(f"unknown granularity '{granularity}'; choose one of {', '.join(GRANULARITIES)}")
    if granularity == "sublayer" and method != "gates":
        raise FoldGPTError(f"--granularity sublayer needs --method gates (method '{method}' scores whole blocks)")
    return method


def effective_probe(probe: ProbeConfig | None, method: str, granularity: str) -> ProbeConfig | None:
    """The probe ``prune`` runs: None when off, or when a screen-only default meets a method it does not apply to
    (that method keeps its own set); healing probes (``sets > 0``) for anything but gates on whole blocks are refused."""
    if probe is None:
        return None
    whole_block_gates = method == "gates" and granularity == "block"
    if not whole_block_gates and probe.sets > 0:
        raise FoldGPTError("--gate-probe-sets needs --method gates with whole blocks (it probes sets near the gates' pick)")
    if probe.sets == probe.screen == 0 or not whole_block_gates:
        return None
    return probe


def check_prunable(loaded: LoadedModel) -> None:
    """Refuse folded or healed models and models whose sub-layers were removed already."""
    model = loaded.model
    if getattr(model.config, "foldgpt_sharing", None) or hasattr(model, "get_base_model"):
        raise FoldGPTError(f"'{loaded.source}' is folded or healed; remove blocks first, then fold (prune the unfolded model)")
    refuse_removed_sublayers(model, "pruning")


@dataclass(frozen=True)
class RemovalBudget:
    """How much a selection removes: ``n_remove`` blocks, or (sub-layers) each gate's ``costs`` and the cost
    ``needed``; neither when the blocks are given."""

    n_remove: int | None = None
    costs: list[float] | None = None
    needed: float = 0.0


def removal_budget(model: PreTrainedModel, target: RemovalTarget, granularity: str, given: bool) -> RemovalBudget:
    """The target in blocks (or sub-layer costs) for this model; refuses targets out of range."""
    if granularity == "sublayer":
        check_sublayer_removal_supported(model)
        costs, needed = sublayer_budget(model, target)
        return RemovalBudget(costs=costs, needed=needed)
    if given:
        return RemovalBudget()
    return RemovalBudget(n_remove=blocks_to_remove(model, target))


def select_for_pruning(loaded: LoadedModel, method: str, granularity: str, budget: RemovalBudget,
                       calibration: CalibrationConfig, gate_config: GateConfig | None, probe: ProbeConfig | None) -> Selection:
    """The selection of ``method`` on the calibration windows (then the probe's pick, with ``probe``)."""
    model = loaded.model
    windows = load_windows(loaded.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    if granularity == "sublayer":
        assert budget.costs is not None  # removal_budget gives sub-layer costs for sub-layer granularity
        select = select_sublayers_by_gates_with(gate_config or GateConfig(), budget.costs, budget.needed)
        return select_blocks_with(select, "gates", model, windows, 0, calibration.seed)
    assert budget.n_remove is not None  # removal_budget gives a block count for whole blocks
    if method == "gates" and gate_config is not None:
        selection = select_blocks_with(select_by_gates_with(gate_config), "gates", model, windows, budget.n_remove,
                                       calibration.seed)
    else:
        selection = select_blocks(method, model, windows, budget.n_remove, calibration.seed)
    if method == "gates":  # half-open gates rank dimming, not removal: say so
        selection.details["polarization"] = warn_if_unpolarized(polarization(selection.scores or []))
    return selection if probe is None else probed_selection(loaded, selection, budget.n_remove, probe, calibration, windows)


def sublayer_metadata(source: str, selection: Selection, num_blocks: int, saved: dict[str, list[int]],
                      model: PreTrainedModel) -> dict:
    """The keys a sub-layer prune adds to ``foldgpt.json`` (``model``: after removal, the branches zeroed)."""
    return {
        "granularity": "sublayer",
        "removed_sublayers": selection.removed_sublayers,  # in the input's numbering, blocks that stay
        "removed_sublayers_original": {branch: in_original_numbering(source, blocks, num_blocks)
                                       for branch, blocks in selection.removed_sublayers.items()},
        "removed_sublayers_saved": saved,  # in the saved folder's numbering, as in its config
        "sublayers_removed": sum(len(v) for v in selection.details["closed_sublayers"].values()),
        "parameters_after_plain": count_parameters(model),  # the zeroed plain folder, every tensor kept
    }


def write_pruned(loaded: LoadedModel, metadata: dict, selection: Selection, granularity: str, out: Path,
                 overwrite: bool) -> None:
    """The plain HF folder with ``foldgpt.json`` and, after gates, their trajectory as ``gates.png``; all or nothing."""
    with atomic_output_dir(out, overwrite) as folder:
        save_plain_model(loaded.model, loaded.tokenizer, folder, metadata)
        if "gate_history" in selection.details:
            plot = plot_sublayer_gate_history if granularity == "sublayer" else plot_gate_history
            plot(selection.details["gate_history"], folder / "gates.png", title=Path(loaded.source).name,
                 run_steps=selection.details["hyperparameters"]["steps"])


def warn_if_unpolarized(report: dict) -> dict:
    """Print one line when gate training ended with gates still half open (``polarization``); returns ``report``."""
    if not report["polarized"]:
        print(f"foldgpt: warning: the gates did not polarize: block(s) {', '.join(map(str, report['half_open']))} ended "
              f"between {report['low']} and {report['high']}, so they rank the cost of dimming blocks, not of removing "
              "them; the screen of candidate sets decides on real removals (--gate-probe-screen > 0)", file=sys.stderr)
    return report


def probed_selection(loaded: LoadedModel, selection: Selection, n_remove: int, probe: ProbeConfig,
                     calibration: CalibrationConfig | None = None, windows: torch.Tensor | None = None) -> Selection:
    """``selection`` with the set its screen / healing probes chose, their time added and their record under
    ``details["probe"]`` (``loaded`` is the dense model: nothing has been removed yet). With the calibration
    ``windows`` (and their ``calibration``) the baselines' sets join the candidates, judged on held-out text that
    skips those windows (``choose_by_probe``)."""
    if selection.scores is None:
        raise FoldGPTError(f"method '{selection.method}' gives no per-block scores to draw probe candidates from")
    start = time.perf_counter()
    outcome = choose_by_probe(loaded, selection.scores, n_remove, probe, calibration, windows)
    seconds = time.perf_counter() - start
    details = {**selection.details, "probe": {**outcome, "seconds": seconds}}
    return replace(selection, removed=outcome["chosen"], details=details, seconds=selection.seconds + seconds)


def remove_selection(model: PreTrainedModel, selection: Selection, num_blocks: int) -> dict[str, list[int]]:
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
