"""``foldgpt fold``: grouped sharing, saved in the compact format."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from foldgpt.cli.commands.common import fold_probe, load, print_fold_choice
from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import FoldSettings
from foldgpt.core.outputs import check_output_free, read_metadata
from foldgpt.errors import FoldGPTError
from foldgpt.formats.plain import folder_weight_bytes
from foldgpt.workflows.fold import FoldResult, fold_model, tie_model
from foldgpt.workflows.fold_plan import fold_auto


def run(args: argparse.Namespace) -> None:
    settings: FoldSettings = read_config(args, FoldSettings())
    check_output_free(Path(args.out), args.overwrite)
    sharing = settings.sharing
    if settings.sharing.fold == "auto":
        result = _auto(settings, args)
    elif settings.ties.ties is not None:
        result = _tie(settings, args)
    else:
        result = fold_model(load(settings.loading), group_size=sharing.group_size, groups=sharing.groups,
                            parent=sharing.parent, out=args.out, overwrite=args.overwrite)
    report = result.report
    print(f"{'group':<12}{'parent':>7}{'unique':>14}{'materialised':>14}")
    for group in report.per_group:
        span = f"{group['blocks'][0]}-{group['blocks'][-1]}" if len(group["blocks"]) > 1 else str(group["blocks"][0])
        print(f"{span:<12}{group['parent']:>7}{group['unique']:>14,}{group['materialised']:>14,}")
    print(f"parameters: {report.unique:,} unique, {report.materialised:,} materialised (compression {report.compression:.2f}x); "
          f"weights on disk {folder_weight_bytes(args.out) / 2**20:.1f} MiB; wrote {args.out}")


def _tie(settings: FoldSettings, args: argparse.Namespace) -> FoldResult:
    """Ties against the dense model: the one a pruned folder came from (its ``foldgpt.json``), else the model itself."""
    if settings.sharing.group_size is not None or settings.sharing.groups is not None:
        raise FoldGPTError("give either --ties or --group-size/--groups, not both")
    student = load(settings.loading)
    metadata = read_metadata(student.source)
    dense = metadata.get("source_model") if metadata.get("stage") == "prune" else None
    teacher = load(replace(settings.loading, model=dense)) if dense else load(settings.loading)
    result = tie_model(student, teacher, settings.ties, out=args.out, overwrite=args.overwrite)
    for fit in result.metadata["tie_fits"]:
        print(f"tie at position {fit['child']}: local error {fit['losses'][0]:.3f} -> {fit['losses'][-1]:.3f}")
    return result


def _auto(settings: FoldSettings, args: argparse.Namespace) -> FoldResult:
    """``--fold auto`` on a pruned folder: its removal against the tie candidate, built from the model it came from,
    each healed first for ``--tie-probe-steps`` steps with ``foldgpt heal``'s defaults (0: compared unhealed)."""
    if settings.ties.ties is not None:
        raise FoldGPTError("--fold auto plans its own ties; drop --ties (or give --ties without --fold auto)")
    student = load(settings.loading)
    metadata = read_metadata(student.source)
    if metadata.get("stage") != "prune":
        raise FoldGPTError(f"--fold auto needs a folder written by 'foldgpt prune'; '{student.source}' is not one")
    dense = replace(settings.loading, model=metadata["source_model"])
    result = fold_auto(student, load(dense), load(dense), metadata["removed"], settings.ties, out=args.out,
                       overwrite=args.overwrite, probe=fold_probe(settings.ties))
    print_fold_choice(result.metadata)
    return result
