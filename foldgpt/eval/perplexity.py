"""Perplexity, with the protocol of the depth-pruning papers (SparseGPT, ShortGPT, SLEB).

The evaluation text is tokenised as one sequence and cut into non-overlapping windows of ``seqlen`` tokens; each
window is scored independently (no context carried over) and perplexity is ``exp`` of the mean next-token negative
log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.errors import FoldGPTError


@dataclass
class PerplexityResult:
    """One perplexity figure and what it was measured on."""

    dataset: str
    perplexity: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def windows_perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl", progress: bool = True
) -> float:
    """exp(mean NLL) of ``model`` over ``windows`` (shape ``[n, seqlen]``)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=not progress or len(windows) < 2):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    mean_nll = total_nll / total_tokens
    if not math.isfinite(mean_nll):
        raise FoldGPTError("perplexity is not finite: the model produced NaN or inf logits; check the model's weights and dtype")
    return math.exp(mean_nll)


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """Perplexity of ``model`` on a data set's evaluation split (or a file), papers' protocol."""
    start = time.perf_counter()
    windows = evaluation_windows(tokenize(tokenizer, load_text(dataset, "evaluation")), seqlen, max_tokens)
    value = windows_perplexity(model, windows, batch_size=batch_size, desc=f"ppl {dataset}")
    return PerplexityResult(
        dataset=dataset,
        perplexity=value,
        tokens=windows.numel(),
        windows=len(windows),
        seqlen=seqlen,
        seconds=time.perf_counter() - start,
    )
