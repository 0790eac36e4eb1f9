"""The ``prune --offload blocks`` workflow: selection block by block, kept tensors copied file to file."""

from __future__ import annotations

import json
import time
from pathlib import Path

from foldgpt._version import __version__
from foldgpt.core.lineage import in_original_numbering
from foldgpt.core.outputs import METADATA_FILE, atomic_output_dir
from foldgpt.core.system import peak_rss_bytes
from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.formats.blockwise import BlockwiseModel, write_without_blocks
from foldgpt.selection.blockwise import blockwise_selection, check_blockwise_method
from foldgpt.surgery.budget import RemovalTarget, blocks_to_remove, model_flops_per_token
from foldgpt.surgery.removal import count_parameters, remove_blocks


def prune_blockwise(spec: str, method: str = "bi", remove: int | None = None, remove_ratio: float | None = None, calibration=None,
                    out: str | Path | None = None, overwrite: bool = False, target_params: float | None = None,
                    target_flops: float | None = None, dtype: str = "float32", device: str = "cpu",
                    offload_dir: str | Path | None = None) -> dict:
    """:func:`foldgpt.pruning.prune` for ``bi`` / ``angular`` / ``sleb``, never holding more than one block: the selection
    block by block, then the kept tensors copied file to file (renumbered) into the output folder. Returns the metadata
    written to ``foldgpt.json``."""

    check_blockwise_method(method)
    calibration = calibration or CalibrationConfig()
    runner = BlockwiseModel(spec, dtype=dtype, device=device)
    skeleton = runner.skeleton()
    num_blocks = runner.num_blocks
    target = RemovalTarget(remove=remove, remove_ratio=remove_ratio, target_params=target_params, target_flops=target_flops)
    n_remove = blocks_to_remove(skeleton, target)
    parameters_before = count_parameters(skeleton)
    flops_before = model_flops_per_token(skeleton, target.flops_context)
    start = time.perf_counter()
    windows = load_windows(runner.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    selection = blockwise_selection(method, runner, windows, n_remove, offload_dir)
    remove_blocks(skeleton, selection.removed)
    metadata = {
        "foldgpt_version": __version__,
        "stage": "prune",
        "source_model": runner.source,
        "method": method,
        "num_blocks_before": num_blocks,
        "num_blocks_after": num_blocks - n_remove,
        "removed": selection.removed,
        "removed_original": in_original_numbering(runner.source, selection.removed, num_blocks),
        "scores": selection.scores,
        "details": selection.details,
        "calibration": vars(calibration),
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(skeleton),
        "target": {name: getattr(target, name) for name in target.given()},
        "flops_per_token_before": flops_before,
        "flops_per_token_after": model_flops_per_token(skeleton, target.flops_context),
        "flops_context": target.flops_context,
        "selection_seconds": selection.seconds,
        "total_seconds": time.perf_counter() - start,
        "offload": "blocks",
    }
    if out is not None:
        with atomic_output_dir(Path(out), overwrite) as folder:
            write_without_blocks(runner, skeleton, selection.removed, folder)
            metadata["total_seconds"] = time.perf_counter() - start
            metadata["peak_rss_bytes"] = peak_rss_bytes()

            (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
