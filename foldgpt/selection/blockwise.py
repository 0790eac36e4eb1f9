"""Selection methods run block by block (bi, angular, SLEB), for models larger than memory."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from foldgpt.analysis.blockwise import blockwise_redundancy_stats
from foldgpt.core.system import scratch_folder
from foldgpt.errors import FoldGPTError
from foldgpt.eval.blockwise import perplexity_from_states
from foldgpt.formats.blockwise import BlockwiseModel, HiddenStates, window_batches_of
from foldgpt.selection.angular import selection_from_stats as angular_selection
from foldgpt.selection.base import Selection
from foldgpt.selection.bi import selection_from_stats as bi_selection

BLOCKWISE_METHODS = ("bi", "angular", "sleb")
"""The ``--method`` choices ``prune --offload blocks`` runs block by block; the others need the whole model."""


def new_stream(folder: Path | None, name: str) -> HiddenStates:
    """An empty hidden-state stream: in memory, or in a file of its own under ``folder`` (a :class:`HiddenStates` keeps
    one file per folder, so each stream gets a sub-folder ``name``)."""
    if folder is None:
        return HiddenStates()
    (folder / name).mkdir()
    return HiddenStates(folder / name)


@torch.no_grad()
def sleb_step(runner: BlockwiseModel, batches: Sequence[torch.Tensor], removed: Sequence[int], folder: Path | None,
               desc: str) -> dict[int, float]:
    """The calibration perplexity of the model without ``removed`` plus each remaining block ``c``, from one sweep.

    Running each candidate model in turn would read every block's weights once per candidate; instead one sweep over
    the kept blocks carries a *base* stream (the model without ``removed``) and one stream per candidate ``c``. The
    stream of ``c`` is born at block ``c`` as a copy of the base stream's input to ``c`` (so ``c`` is skipped), and
    from then on every loaded block runs on the base stream and on every live candidate stream. Each block is read
    once per step, and about half the block calls of the per-candidate passes are made (a candidate's stream shares
    the base stream's work up to its own block). Returns ``{c: perplexity}`` in ascending ``c``, the order in which
    :func:`foldgpt.importance.sleb.select_by_sleb` scores them (so ties break the same way).
    """
    kept = sorted(set(range(runner.num_blocks)) - set(removed))
    base = new_stream(folder, "base")
    for batch in batches:
        base.append(runner.embed(batch))
    candidates: dict[int, HiddenStates] = {}
    for index in tqdm(kept, desc=desc, leave=False):
        runner.load_block(index)
        born = new_stream(folder, f"without_{index}")
        for number, batch in enumerate(batches):
            x = base[number]
            for stream in candidates.values():
                stream[number] = runner.run_block(index, stream[number], batch.shape)
            born.append(x)
            if index != kept[-1]:  # the base model's own output is never scored
                base[number] = runner.run_block(index, x, batch.shape)
        candidates[index] = born
        runner.free_block(index)
    return {candidate: perplexity_from_states(runner, batches, stream) for candidate, stream in candidates.items()}


def blockwise_sleb(runner: BlockwiseModel, windows: torch.Tensor, n_remove: int, batch_size: int = 1,
                   offload_dir: str | Path | None = None) -> Selection:
    """:func:`foldgpt.importance.sleb.select_by_sleb`, block by block: the same greedy search and ``details``, one sweep
    over the blocks per removed block (:func:`sleb_step`).

    The candidate streams take up to (remaining blocks + 1) times the calibration set's hidden states; with
    ``offload_dir`` they are files there (removed after each step) instead of CPU memory.
    """

    batches = window_batches_of(windows, batch_size)
    removed: list[int] = []
    steps = []
    for step in range(n_remove):
        with ExitStack() as stack:
            folder = scratch_folder(stack, offload_dir) if offload_dir is not None else None
            scores = sleb_step(runner, batches, removed, folder, desc=f"sleb step {step + 1}/{n_remove} (blocks)")
        best = min(scores, key=scores.__getitem__)
        removed.append(best)
        steps.append({"removed": best, "calibration_perplexity": scores[best]})
    return Selection(method="sleb", removed=sorted(removed), details={"order": removed, "steps": steps})


def check_blockwise_method(method: str) -> None:
    """A one-line error unless ``method`` is one of :data:`BLOCKWISE_METHODS`."""
    if method not in BLOCKWISE_METHODS:
        *first, last = BLOCKWISE_METHODS
        raise FoldGPTError(f"--offload blocks supports --method {', '.join(first)} and {last}; '{method}' needs the whole model")


def blockwise_selection(method: str, runner: BlockwiseModel, windows: torch.Tensor, n_remove: int,
                        offload_dir: str | Path | None = None) -> Selection:
    """The ``bi`` or ``angular`` selection from block-by-block statistics, or the block-by-block SLEB search."""

    check_blockwise_method(method)
    start = time.perf_counter()
    if method == "sleb":
        selection = blockwise_sleb(runner, windows, n_remove, offload_dir=offload_dir)
    else:
        stats = blockwise_redundancy_stats(runner, windows, offload_dir=offload_dir, similarity=False)
        selection = {"bi": bi_selection, "angular": angular_selection}[method](stats, n_remove)
    selection.seconds = time.perf_counter() - start
    return selection
