"""Perplexity computed block by block, for models larger than memory."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

from foldgpt.core.system import scratch_folder
from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.errors import FoldGPTError
from foldgpt.eval.perplexity import PerplexityResult
from foldgpt.formats.blockwise import BlockwiseModel, HiddenStates, window_batches_of


@torch.no_grad()
def blockwise_windows_perplexity(
    runner: BlockwiseModel, windows: torch.Tensor, batch_size: int = 1, offload_dir: str | Path | None = None
) -> float:
    """What :func:`foldgpt.evaluation.windows_perplexity` computes, block by block, then the model's head per batch."""
    with ExitStack() as stack:
        folder = scratch_folder(stack, offload_dir) if offload_dir is not None else None
        states = runner.sweep(windows, batch_size, lambda *_: None, folder, desc="ppl (blocks)")
        return perplexity_from_states(runner, window_batches_of(windows, batch_size), states)




@torch.no_grad()
def perplexity_from_states(runner: BlockwiseModel, batches: Sequence[torch.Tensor], states: HiddenStates) -> float:
    """exp(mean NLL) over ``batches`` given their last block's outputs ``states`` (one entry per batch): the head runs
    here, once per batch, so that the blocks' sweep never needs it."""
    total_nll, total_tokens = 0.0, 0
    for number, batch in enumerate(batches):
        logits = runner.logits(batch, states[number])[:, :-1].float()
        targets = batch[:, 1:].to(logits.device)
        total_nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    mean_nll = total_nll / total_tokens
    if not math.isfinite(mean_nll):
        raise FoldGPTError("perplexity is not finite: the model produced NaN or inf logits; check the model's weights and dtype")
    return math.exp(mean_nll)


def blockwise_perplexity(runner: BlockwiseModel, dataset: str = "wikitext2", seqlen: int = 2048, max_tokens: int | None = None,
                         batch_size: int = 1, offload_dir: str | Path | None = None):
    """:func:`foldgpt.evaluation.perplexity`, block by block."""

    start = time.perf_counter()
    windows = evaluation_windows(tokenize(runner.tokenizer, load_text(dataset, "evaluation")), seqlen, max_tokens)
    value = blockwise_windows_perplexity(runner, windows, batch_size, offload_dir)
    return PerplexityResult(dataset=dataset, perplexity=value, tokens=windows.numel(), windows=len(windows), seqlen=seqlen,
                            seconds=time.perf_counter() - start)
