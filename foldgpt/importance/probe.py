"""Healing probes: choose among near-tied removal sets by how well each *heals*, not by its damage before healing.

Why: on SmolLM2-135M the gates' set for 6 blocks (4 5 13 14 25 26) is the lowest-perplexity set before healing, yet
Block Influence's (12 13 14 17 25 26) ends lower after the same healing, on Alpaca and on in-domain text alike (README,
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
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from foldgpt.data import evaluation_windows, load_text, tokenize
from foldgpt.errors import FoldGPTError
from foldgpt.evaluation import windows_perplexity
from foldgpt.models.loading import LoadedModel
from foldgpt.removal import blocks_removed_temporarily, remove_blocks

PIPELINE_PROBE_SETS = 3
"""``foldgpt compress``'s default ``sets``: the pipeline heals, so it picks its set by healing (``prune``'s default
is ``PRUNE_SCREEN``: its output is judged before healing, so it picks by the screen alone)."""


@dataclass(frozen=True)
class ProbeConfig:
    """How many candidate sets to probe (0 = off: keep the method's own set) and how long and where to probe them.

    Defaults measured on SmolLM2-135M (README, "Choosing the set by a healing probe"): 8-step probes scored on 8,192
    tokens ordered the 6-block sets right but picked a 4-block set that the full heal put last; probes of the full
    25 steps scored on 32,768 tokens order the 4-block sets as the full heal does on the test split and keep the
    6-block pick. The screen stays on the first 8,192 tokens (24 forward passes of 32k would cost more than the probes).
    """

    sets: int = 0
    screen: int = 24
    pool: int = 3
    steps: int = 25
    seqlen: int = 1024
    data: str = "alpaca"
    eval_data: str = "wikitext2"
    eval_tokens: int = 32768
    screen_tokens: int = 8192
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ProbeConfig:
        """The config of CLI / ``compress`` settings: ``--gate-probe-sets`` is ``settings["gate_probe_sets"]``, ...

        The probes score on the calibration text's held-out split (``--calibration``), and where the settings say how
        the model will be healed (``compress``: ``--heal-data``, ``--heal-seqlen``, ``--heal-seed``) they heal the
        same way, so that they measure the heal that follows.
        """
        return cls(sets=settings["gate_probe_sets"], screen=settings["gate_probe_screen"], steps=settings["gate_probe_steps"],
                   pool=settings["gate_probe_pool"], eval_tokens=settings["gate_probe_tokens"],
                   eval_data=settings.get("calibration") or cls.eval_data, data=settings.get("heal_data") or cls.data,
                   seqlen=settings.get("heal_seqlen") or cls.seqlen, seed=settings.get("heal_seed", cls.seed))

    def __post_init__(self) -> None:
        for name in ("sets", "screen", "pool"):
            if getattr(self, name) < 0:
                raise FoldGPTError(f"healing probes need {name} >= 0, got {getattr(self, name)}")
        for name in ("steps", "seqlen"):
            if getattr(self, name) < 1:
                raise FoldGPTError(f"healing probes need {name} >= 1, got {getattr(self, name)}")
        for name in ("eval_tokens", "screen_tokens"):
            if getattr(self, name) < self.seqlen:
                raise FoldGPTError(f"healing probes score at least one window: {name} ({getattr(self, name)}) must be >= "
                                   f"seqlen ({self.seqlen})")


PRUNE_SCREEN = ProbeConfig(sets=0, screen=24)
"""``foldgpt prune --method gates``'s default: screen the 24 sets nearest the gates' pick on held-out text and remove
the lowest, no healing. On SmolLM2 (validation text the screen never saw: WikiText-2 validation after the screened
tokens and PTB validation; ``benchmarks/gate_screen.py``) it lowered the mean log perplexity at 4 and 6 blocks and on
average over 4, 6 and 8; on the test split only at 4, where it takes PTB below angular distance's (README, "Screening
the gates' near-ties")."""


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


def probe_sets(dense: LoadedModel, records: list[dict], windows: torch.Tensor, config: ProbeConfig) -> list[dict]:
    """Heal each screened candidate briefly from a copy of ``dense`` (the teacher too); ``records`` with
    ``"ppl_after"`` (perplexity on ``windows`` after the probe) added."""
    from foldgpt.healing import HealConfig, heal  # noqa: PLC0415 (healing imports the model stack: load it only to probe)

    probed = []
    with tempfile.TemporaryDirectory(prefix="foldgpt-probe-") as cache:
        heal_config = HealConfig(data=config.data, steps=config.steps, seqlen=config.seqlen, seed=config.seed,
                                 checkpoint_every=0, teacher_cache=str(Path(cache) / "teacher"))
        for record in tqdm(records, desc="healing probes", leave=False):
            healed = heal(without(dense, record["removed"]), dense, heal_config).loaded
            probed.append({**record, "ppl_after": windows_perplexity(healed.model, windows, progress=False)})
            del healed
    return probed


def choose_by_probe(dense: LoadedModel, scores: Sequence[float], n_remove: int, config: ProbeConfig) -> dict:
    """Screen and probe the candidates of ``scores``; ``{"chosen", "first", "screened", "candidates", "config"}``
    for ``foldgpt.json`` (``first``: the plain lowest-score set; ``candidates``: the healed ones). With ``sets`` 0
    nothing heals: the set with the lowest screened perplexity is chosen (``prune``'s default, see ``PRUNE_SCREEN``)."""
    windows = heldout_windows(dense, config)
    candidates = candidate_sets(scores, n_remove, max(config.screen, config.sets), config.pool)
    seqlen = windows.shape[1]
    screened = screen_sets(dense, candidates, windows[: config.screen_tokens // seqlen])  # >= 1: screen_tokens >= seqlen
    best_screened = sorted(screened, key=lambda record: record["ppl_before"])
    if config.sets == 0:
        return {"chosen": best_screened[0]["removed"], "first": candidates[0], "screened": screened, "candidates": [],
                "config": asdict(config)}
    best_screened = best_screened[: config.sets]
    probed = probe_sets(dense, best_screened, windows, config)
    best = min(probed, key=lambda record: record["ppl_after"])
    return {"chosen": best["removed"], "first": candidates[0], "screened": screened, "candidates": probed,
            "config": asdict(config)}
