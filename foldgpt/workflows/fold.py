"""The ``fold`` and ``export`` workflows: grouped sharing saved in the compact format, and the plain export.

``fold``: (pruned) model -> groups and parents -> shared ``nn.Parameter``s -> compact folder + parameter report.
``export``: compact folder -> per-position copies of the shared weights (LoRA merged per position if healed) ->
vanilla Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads without ``trust_remote_code``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from foldgpt.arch.adapters import adapter_for
from foldgpt.core.lineage import origin_metadata
from foldgpt.core.outputs import atomic_output_dir, read_metadata
from foldgpt.data.windows import load_windows
from foldgpt.errors import FoldGPTError
from foldgpt.formats.compact import save_compact
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.save import save_healed
from foldgpt.healing.ties import add_tie_deltas, fit_tie_deltas
from foldgpt.surgery.config import TieConfig
from foldgpt.surgery.sharing import (
    ParameterReport,
    choose_parents,
    contiguous_groups,
    fold,
    parameter_report,
    parse_groups,
    validate_groups,
)
from foldgpt.surgery.sublayers import refuse_removed_sublayers
from foldgpt.surgery.ties import (
    TiePlan,
    block_linears,
    kept_blocks,
    parse_ties,
    tie_groups,
    tie_positions,
)


@dataclass
class FoldResult:
    """The folded model, its parameter report and the metadata written to ``foldgpt.json``."""

    loaded: LoadedModel
    report: ParameterReport
    metadata: dict


def fold_model(
    loaded: LoadedModel,
    group_size: int | None = None,
    groups: str | list[list[int]] | None = None,
    parent: str = "first",
    out: str | Path | None = None,
    overwrite: bool = False,
) -> FoldResult:
    """Share weights within contiguous groups of ``loaded.model``'s blocks, in place; save a compact folder to ``out``.

    Give ``group_size`` (G consecutive blocks per group, the last group may be shorter; 1 = no sharing) or ``groups``
    (``"0-3,4-5,..."`` or a list of index lists over the model's current blocks). ``parent`` picks each group's
    parent: ``first``, ``middle``, or ``largest-gate`` (the block whose learned gate stayed most open; needs a folder
    written by ``prune --method gates``).
    """
    model = loaded.model
    if hasattr(model, "get_base_model"):
        raise FoldGPTError("this model carries a LoRA adapter (it was healed); fold before healing, or export it with --plain first")
    refuse_removed_sublayers(model, "folding")
    num_blocks = len(adapter_for(model).layers(model))
    group_list = _groups(num_blocks, group_size, groups)
    parents = choose_parents(group_list, parent, _gate_values(loaded.source, num_blocks) if parent == "largest-gate" else None)
    before = parameter_report(model)
    fold(model, group_list, parents)
    report = parameter_report(model)
    metadata = {
        **origin_metadata("fold", loaded.source, loaded.hub),
        "groups": group_list,
        "parents": parents,
        "parent_rule": parent,
        "parameters_before": before.unique,
        "parameters": report.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    if out is not None:
        with atomic_output_dir(Path(out), overwrite) as folder:
            save_compact(model, loaded.tokenizer, folder, metadata)
    return FoldResult(loaded=loaded, report=report, metadata=metadata)


def tie_model(
    loaded: LoadedModel,
    teacher: LoadedModel,
    config: TieConfig,
    out: str | Path | None = None,
    overwrite: bool = False,
    removed: Sequence[int] | None = None,
) -> FoldResult:
    """Tie kept blocks of ``loaded.model`` (a pruned or dense model) to their neighbours, in place, and fit the ties.

    ``config.ties`` names ``PARENT:CHILD`` pairs in the *original* model's indices (a pruned folder's ``foldgpt.json``
    says which blocks it removed). Each child shares its parent's linear weights and gets a rank-``config.rank``
    LoRA delta started from the SVD of its own weights' difference, then fitted with its norms by local
    reconstruction against ``teacher`` (the dense model) on ``config.fit_windows`` windows of ``config.data``.
    The compact folder written to ``out`` stores the deltas unmerged in ``adapter/``; ``foldgpt heal`` trains them on.
    ``removed`` names the blocks already removed from ``loaded.model`` (original indices) when no ``foldgpt.json``
    says so.
    """
    model = loaded.model
    if hasattr(model, "get_base_model"):
        raise FoldGPTError("this model carries a LoRA adapter (it was healed or tied); tie the pruned folder instead")
    if config.ties is None:
        raise FoldGPTError("no ties given; pass --ties PARENT:CHILD,... (neighbouring kept blocks, original indices)")
    refuse_removed_sublayers(model, "tying")
    num_blocks = len(adapter_for(model).layers(model))
    if removed is None:
        removed, num_before = _removed_blocks(loaded.source, num_blocks)
    else:
        removed, num_before = list(removed), num_blocks + len(removed)
    plan = TiePlan(tuple(removed), parse_ties(config.ties), config.rank)
    groups, parents = tie_groups(plan, num_before)
    positions = tie_positions(plan, num_before)
    layers = adapter_for(model).layers(model)
    own = {child: {name: m.weight.detach().clone() for name, m in block_linears(layers[child]).items()} for _, child in positions}
    before = parameter_report(model)
    fold(model, groups, parents)
    peft_model = add_tie_deltas(model, positions, config.rank, own)
    fits: list[dict] = []
    if config.fit_steps:
        windows = load_windows(loaded.tokenizer, config.data, config.fit_windows, config.fit_seqlen, config.seed)
        fits = fit_tie_deltas(peft_model, teacher.model, windows, positions, kept_blocks(num_before, removed), config)
    report = parameter_report(model)
    metadata = {
        **origin_metadata("fold", loaded.source, loaded.hub),
        "groups": groups,
        "parents": parents,
        "parent_rule": "ties",
        "ties": plan.to_dict(),
        "tie_positions": [list(tie) for tie in positions],
        "tie_fits": fits,
        "tie_config": dict(config.__dict__),
        "parameters_before": before.unique,
        "parameters": report.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    tied = LoadedModel(model=peft_model, tokenizer=loaded.tokenizer, source=loaded.source)
    if out is not None:
        tied = save_healed(tied, Path(out), metadata, overwrite=overwrite)
    return FoldResult(loaded=tied, report=report, metadata=metadata)


def _removed_blocks(source: str, num_blocks: int) -> tuple[list[int], int]:
    """The blocks a pruned folder's ``foldgpt.json`` says were removed, and the block count before; none otherwise."""
    metadata = read_metadata(source)
    if "removed" in metadata and metadata.get("num_blocks_before", 0) - len(metadata["removed"]) == num_blocks:
        return list(metadata["removed"]), int(metadata["num_blocks_before"])
    return [], num_blocks

def _groups(num_blocks: int, group_size: int | None, groups: str | list[list[int]] | None) -> list[list[int]]:
    if (group_size is None) == (groups is None):
        raise FoldGPTError("give exactly one of --group-size G or --groups '0-3,4-5,...'")
    if group_size is not None:
        return contiguous_groups(num_blocks, group_size)
    if isinstance(groups, str):
        return parse_groups(groups, num_blocks)
    assert groups is not None
    validate_groups(groups, num_blocks)
    return groups


def _gate_values(source: str, num_blocks: int) -> list[float] | None:
    """Final gate value of each current block, from the ``foldgpt.json`` of a gates-pruned folder (None otherwise)."""
    metadata = read_metadata(source)
    if metadata.get("method") != "gates" or "scores" not in metadata:
        return None
    removed = set(metadata["removed"])
    kept = [i for i in range(metadata["num_blocks_before"]) if i not in removed]
    if len(kept) != num_blocks:
        return None
    scores = metadata["scores"]
    if metadata.get("granularity") == "sublayer":  # a block's value: the more open of its two sub-layer gates
        scores = [max(scores[2 * i], scores[2 * i + 1]) for i in range(len(scores) // 2)]
    return [scores[i] for i in kept]
