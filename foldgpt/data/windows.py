"""Tokenisation of text into fixed-length windows: random calibration windows and consecutive evaluation windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foldgpt.data.text import load_text
from foldgpt.errors import FoldGPTError


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (as the pruning papers do, no truncation)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def calibration_starts(length: int, nsamples: int, seqlen: int, seed: int = 0) -> list[int]:
    """Where ``calibration_windows`` cuts its windows from a text of ``length`` tokens (seeded random offsets), so
    that held-out text can avoid them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, length - seqlen + 1, (nsamples,), generator=generator).tolist()


def calibration_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets, shape ``[nsamples, seqlen]``."""
    _check_window_args(token_ids, nsamples, seqlen)
    starts = calibration_starts(len(token_ids), nsamples, seqlen, seed)
    return torch.stack([token_ids[start : start + seqlen] for start in starts])


def windows_avoiding(token_ids: torch.Tensor, seqlen: int, max_tokens: int, avoid: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens from the start of ``token_ids``, skipping every window
    that overlaps a span ``[start, end)`` of ``avoid``, until ``max_tokens`` tokens are taken: text that a method
    calibrated on ``avoid`` has never seen. Fewer windows when the text runs out, none when every window overlaps."""
    _check_window_args(token_ids, 1, seqlen)
    kept: list[torch.Tensor] = []
    for start in range(0, len(token_ids) - seqlen + 1, seqlen):
        if len(kept) * seqlen >= max_tokens:
            break
        if not any(start < end and begin < start + seqlen for begin, end in avoid):
            kept.append(token_ids[start : start + seqlen])
    return torch.stack(kept) if kept else token_ids[:0].view(0, seqlen)


def evaluation_windows(token_ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (the last partial window is dropped)."""
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    _check_window_args(token_ids, 1, seqlen)
    count = len(token_ids) // seqlen
    return token_ids[: count * seqlen].view(count, seqlen)


def _check_window_args(token_ids: torch.Tensor, nsamples: int, seqlen: int) -> None:
    if seqlen < 2:
        raise FoldGPTError(f"sequence length {seqlen} is too small; use --seqlen 2 or more")
    if nsamples < 1:
        raise FoldGPTError(f"number of samples {nsamples} must be at least 1; use --nsamples 1 or more")
    if len(token_ids) < seqlen:
        raise FoldGPTError(f"the text has {len(token_ids)} tokens, too short for one window of {seqlen}; use a smaller --seqlen or more text")


def load_windows(
    tokenizer: PreTrainedTokenizerBase, spec: str, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """Calibration windows of a data spec: the usual one-liner for analysis and pruning."""
    return calibration_windows(tokenize(tokenizer, load_text(spec, "calibration")), nsamples, seqlen, seed)
