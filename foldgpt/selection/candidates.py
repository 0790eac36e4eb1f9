"""Healing probes: choose among near-tied removal sets by how well each *heals*, not by its damage before healing.

Why: on SmolLM2-135M the gates' set for 6 blocks (4 5 13 14 25 26) is the lowest-perplexity set before healing, yet
Block Influence's (12 13 14 17 25 26) ends lower after the same healing, on Alpaca and on in-domain text alike (docs/results/healing.md,
"Window length, budget and seed"). Gates rank blocks by the damage their removal does to the frozen model; what a
user ships is the healed model. A probe asks the healed question directly, on a small scale: each candidate set is
removed from a copy of the dense model, healed for ``steps`` steps of the default heal (``HealConfig``: LoRA + norms,
KL + tail + LM on Alpaca; by default its whole 25-step budget), and scored by perplexity on held-out
calibration-domain text (the first ``eval_tokens`` tokens of ``eval_data``'s calibration split; never a test split).
The lowest wins.

Two stages keep it affordable. The ``screen`` subsets of ``n_remove`` blocks with the smallest summed scores (gate
values), drawn from the ``n_remove + pool`` lowest-scored blocks (the gates' own pick first, then the sets that swap
in the next-closest blocks), are each scored without healing on the first ``screen_tokens`` of the held-out tokens
(one forward pass per window); the ``sets`` best of them are healed and the lowest on all ``eval_tokens`` wins. The teacher's outputs are computed
once and shared by every healed candidate (a temporary cache). Cost: ``screen`` evaluations plus ``sets`` short heals
of ``steps * seqlen`` tokens, each scored on ``eval_tokens``.
"""

from __future__ import annotations

import copy
import heapq
import itertools
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.errors import FoldGPTError
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import LoadedModel
from foldgpt.selection.config import ProbeConfig
from foldgpt.surgery.removal import blocks_removed_temporarily, remove_blocks


def candidate_sets(scores: Sequence[float], n_remove: int, count: int, pool: int) -> list[list[int]]:
    """The ``count`` sets of ``n_remove`` blocks with the smallest summed ``scores``, drawn from the ``n_remove +
    pool`` lowest-scored blocks (ties: the earlier block); the first is the plain lowest-``n_remove`` set."""
    if not 0 < n_remove < len(scores):
        raise FoldGPTError(f"cannot choose {n_remove} of {len(scores)} blocks")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    members = order[: min(len(scores) - 1, n_remove + pool)]
    combos = itertools.combinations(members, n_remove)
    ranked = heapq.nsmallest(max(count, 1), combos, key=lambda combo: (sum(scores[i] for i in combo), sorted(combo)))
    return [sorted(combo) for combo in ranked]


def heldout_windows(dense: LoadedModel, config: ProbeConfig) -> torch.Tensor:
    """The first ``eval_tokens`` tokens of ``eval_data``'s calibration split, in windows of ``seqlen`` (of all its
    tokens in one window if the text is shorter: a small ``--calibration`` file still gets a screen)."""
    tokens = tokenize(dense.tokenizer, load_text(config.eval_data, "calibration"))
    return evaluation_windows(tokens, min(config.seqlen, len(tokens)), config.eval_tokens)


def without(dense: LoadedModel, removed: list[int]) -> LoadedModel:
    """A copy of ``dense`` with ``removed`` taken out (the dense model stays whole: it is the teacher)."""
    return LoadedModel(model=remove_blocks(copy.deepcopy(dense.model), removed), tokenizer=dense.tokenizer,
                       source=dense.source)


def screen_sets(dense: LoadedModel, candidates: list[list[int]], windows: torch.Tensor) -> list[dict]:
    """Each candidate's perplexity on ``windows`` without healing: ``{"removed", "ppl_before"}``. The blocks are taken
    out of ``dense`` for the forward passes and put back (``blocks_removed_temporarily``, as SLEB does): no copy, so the
    screen needs no memory for a second model."""
    records = []
    for removed in tqdm(candidates, desc="screening sets", leave=False):
        with blocks_removed_temporarily(dense.model, removed) as student:
            records.append({"removed": removed, "ppl_before": windows_perplexity(student, windows, progress=False)})
    return records




