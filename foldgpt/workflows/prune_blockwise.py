"""The ``prune --offload blocks`` workflow: selection block by block, kept tensors copied file to file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from foldgpt.core.outputs import METADATA_FILE, atomic_output_dir
from foldgpt.core.system import peak_rss_bytes
from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.formats.blockwise import BlockwiseModel, write_without_blocks
from foldgpt.selection.blockwise import blockwise_selection, check_blockwise_method
from foldgpt.surgery.budget import RemovalTarget, blocks_to_remove
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import remove_blocks
from foldgpt.surgery.replacement import check_replaceable_family
from foldgpt.workflows.prune_metadata import model_cost, prune_metadata
from foldgpt.workflows.replace import replace_removed, with_saved_carriers


def prune_blockwise(spec: str, method: str = "bi", remove: int | None = None, remove_ratio: float | None = None, calibration=None,
                    out: str | Path | None = None, overwrite: bool = False, target_params: float | None = None,
                    target_flops: float | None = None, dtype: str = "float32", device: str = "cpu",
                    offload_dir: str | Path | None = None, replacement: ReplacementConfig | None = None) -> dict:
    """:func:`foldgpt.workflows.prune.prune` for ``bi`` / ``angular`` / ``sleb``, never holding more than one block:
    the selection block by block, then the kept tensors copied file to file (renumbered) into the output folder.
    Returns the metadata written to ``foldgpt.json``: ``prune``'s keys, then ``offload`` (and with ``out``
    ``peak_rss_bytes``, ``total_seconds`` then counting the copy). ``replacement`` fits the removed spans' maps block
    by block too (``foldgpt.workflows.replace``); the changed carriers are written from memory."""

    check_blockwise_method(method)
    calibration = calibration or CalibrationConfig()
    runner = BlockwiseModel(spec, dtype=dtype, device=device)
    replaces = replacement is not None and replacement.replace != "none"
    if replaces:
        check_replaceable_family(runner.config)
    skeleton = runner.skeleton()  # the model without its blocks' tensors: what removal and the budget need
    target = RemovalTarget(remove=remove, remove_ratio=remove_ratio, target_params=target_params, target_flops=target_flops)
    n_remove = blocks_to_remove(skeleton, target)
    before = model_cost(skeleton, target.flops_context)
    start = time.perf_counter()
    windows = load_windows(runner.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    selection = blockwise_selection(method, runner, windows, n_remove, offload_dir)
    extra: dict = {"offload": "blocks"}
    replaced: dict[str, torch.Tensor] = {}
    if replaces:
        assert replacement is not None
        fit_windows = load_windows(runner.tokenizer, calibration.data, replacement.nsamples, replacement.seqlen,
                                   calibration.seed)
        report, replaced = replace_removed(runner, fit_windows, selection.removed, replacement, offload_dir)
        extra["replacement"] = with_saved_carriers(report, selection.removed, runner.num_blocks)
    remove_blocks(skeleton, selection.removed)
    metadata = prune_metadata(source=runner.source, method=method, selection=selection, num_blocks=runner.num_blocks,
                              n_remove=n_remove, calibration=calibration, target=target, before=before,
                              after=model_cost(skeleton, target.flops_context), started=start, extra=extra)
    if out is not None:
        write_blockwise(runner, skeleton, selection.removed, metadata, Path(out), overwrite, start, replaced)
    return metadata


def write_blockwise(runner: BlockwiseModel, skeleton, removed: list[int], metadata: dict, out: Path, overwrite: bool,
                    started: float, replaced: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the kept tensors (those in ``replaced`` from there) into ``out`` and write ``foldgpt.json`` last, its time
    and peak memory counting the copy (``metadata`` is updated in place); all or nothing."""
    with atomic_output_dir(out, overwrite) as folder:
        write_without_blocks(runner, skeleton, removed, folder, replaced)
        metadata["total_seconds"] = time.perf_counter() - started
        metadata["peak_rss_bytes"] = peak_rss_bytes()
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
