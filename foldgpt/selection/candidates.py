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
import sys
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from foldgpt.analysis.redundancy import redundancy_stats
from foldgpt.data.config import CalibrationConfig
from foldgpt.data.text import load_text
from foldgpt.data.windows import calibration_starts, evaluation_windows, tokenize, windows_avoiding
from foldgpt.errors import FoldGPTError
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import LoadedModel
from foldgpt.selection.angular import selection_from_stats as angular_selection
from foldgpt.selection.bi import selection_from_stats as bi_selection
from foldgpt.selection.config import ProbeConfig
from foldgpt.selection.sleb import select_by_sleb
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


def heldout_windows(dense: LoadedModel, config: ProbeConfig, calibration: CalibrationConfig | None = None) -> torch.Tensor:
    """The first ``eval_tokens`` tokens of ``eval_data``'s calibration split, in windows of ``seqlen`` (of all its
    tokens in one window if the text is shorter: a small ``--calibration`` file still gets a screen).

    With ``calibration`` drawn from the same text, every window that overlaps one of its calibration windows is
    skipped, so that the candidates are judged on text the selection methods never saw.
    """
    tokens = tokenize(dense.tokenizer, load_text(config.eval_data, "calibration"))
    seqlen = min(config.seqlen, len(tokens))
    if calibration is None or calibration.data != config.eval_data or seqlen < config.seqlen:
        return evaluation_windows(tokens, seqlen, config.eval_tokens)
    starts = calibration_starts(len(tokens), calibration.nsamples, calibration.seqlen, calibration.seed)
    free = windows_avoiding(tokens, seqlen, config.eval_tokens, [(start, start + calibration.seqlen) for start in starts])
    if len(free) == 0:  # a small calibration text: every window overlaps one; screen on it all the same, and say so
        print(f"foldgpt: warning: every {seqlen}-token window of '{config.eval_data}' overlaps a calibration window; "
              "the candidates are screened on text the selection saw (give more text)", file=sys.stderr)
        return evaluation_windows(tokens, seqlen, config.eval_tokens)
    return free


def baseline_sets(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, methods: Sequence[str]) -> dict[str, list[int]]:
    """The set each of ``methods`` (``BASELINE_CANDIDATES``) removes, from the calibration ``windows``: bi and angular
    share one statistics pass."""
    sets: dict[str, list[int]] = {}
    if {"bi", "angular"} & set(methods):
        stats = redundancy_stats(model, windows)
        if "bi" in methods:
            sets["bi"] = bi_selection(stats, n_remove).removed
        if "angular" in methods:
            sets["angular"] = angular_selection(stats, n_remove).removed
    if "sleb" in methods:
        sets["sleb"] = select_by_sleb(model, windows, n_remove, 0).removed
    return sets


def merged_candidates(near_ties: list[list[int]], baselines: dict[str, list[int]]) -> list[tuple[list[int], list[str]]]:
    """Every distinct set once, with the names of what proposed it: ``gates`` for the near-ties (in their order), then
    each baseline's set (added to the proposers of an equal near-tie instead of repeated)."""
    return merged_proposals({"gates": near_ties, **{name: [removed] for name, removed in baselines.items()}})


def merged_proposals(proposals: dict[str, list[list[int]]]) -> list[tuple[list[int], list[str]]]:
    """Every distinct set once, in the order first proposed, with the names of all that proposed it."""
    merged: dict[tuple[int, ...], list[str]] = {}
    for name, sets in proposals.items():
        for removed in sets:
            origins = merged.setdefault(tuple(sorted(removed)), [])
            if name not in origins:
                origins.append(name)
    return [(list(removed), origins) for removed, origins in merged.items()]


def polarization(gates: Sequence[float], low: float = 0.3, high: float = 0.7) -> dict:
    """Whether trained gates split into closed and open ones: ``{"polarized", "half_open", "low", "high"}`` with the
    indices of the gates still between ``low`` and ``high``. Reading a removal off half-open gates ranks blocks by the
    damage of *dimming* them, which can be far from the damage of removing them (docs/results/gate-selection.md)."""
    half_open = [index for index, value in enumerate(gates) if low < value < high]
    return {"polarized": not half_open, "half_open": half_open, "low": low, "high": high}


def without(dense: LoadedModel, removed: list[int]) -> LoadedModel:
    """A copy of ``dense`` with ``removed`` taken out (the dense model stays whole: it is the teacher)."""
    return LoadedModel(model=remove_blocks(copy.deepcopy(dense.model), removed), tokenizer=dense.tokenizer,
                       source=dense.source)


def screen_sets(dense: LoadedModel, candidates: list[list[int]], windows: torch.Tensor,
                origins: Sequence[list[str]] | None = None) -> list[dict]:
    """Each candidate's perplexity on ``windows`` without healing: ``{"removed", "ppl_before"}`` (and ``"origin"``,
    what proposed it, when ``origins`` is given). The blocks are taken out of ``dense`` for the forward passes and put
    back (``blocks_removed_temporarily``, as SLEB does): no copy, so the screen needs no memory for a second model."""
    records = []
    for index, removed in enumerate(tqdm(candidates, desc="screening sets", leave=False)):
        with blocks_removed_temporarily(dense.model, removed) as student:
            record = {"removed": removed, "ppl_before": windows_perplexity(student, windows, progress=False)}
        if origins is not None:
            record["origin"] = origins[index]
        records.append(record)
    return records




