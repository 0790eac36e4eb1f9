"""Healing probes: heal the best-screened candidate sets briefly and keep the one that heals best."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from foldgpt.data.config import CalibrationConfig
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.selection.candidates import (
    baseline_sets,
    candidate_sets,
    heldout_windows,
    merged_candidates,
    screen_sets,
    without,
)
from foldgpt.selection.config import ProbeConfig


def probe_sets(dense: LoadedModel, records: list[dict], windows: torch.Tensor, config: ProbeConfig) -> list[dict]:
    """Heal each screened candidate briefly from a copy of ``dense`` (the teacher too); ``records`` with
    ``"ppl_after"`` (perplexity on ``windows`` after the probe) added."""

    probed = []
    with tempfile.TemporaryDirectory(prefix="foldgpt-probe-") as cache:
        heal_config = HealConfig(data=config.data, steps=config.steps, seqlen=config.seqlen, seed=config.seed,
                                 checkpoint_every=0, teacher_cache=str(Path(cache) / "teacher"))
        for record in tqdm(records, desc="healing probes", leave=False):
            healed = heal(without(dense, record["removed"]), dense, heal_config).loaded
            probed.append({**record, "ppl_after": windows_perplexity(healed.model, windows, progress=False)})
            del healed
    return probed


def choose_by_probe(dense: LoadedModel, scores: Sequence[float], n_remove: int, config: ProbeConfig,
                    calibration: CalibrationConfig | None = None, calibration_windows: torch.Tensor | None = None) -> dict:
    """Screen and probe the candidates of ``scores``; ``{"chosen", "first", "screened", "candidates", "config"}``
    for ``foldgpt.json`` (``first``: the plain lowest-score set; ``candidates``: the healed ones). With ``sets`` 0
    nothing heals: the set with the lowest screened perplexity is chosen (``prune``'s default, see ``PRUNE_SCREEN``).

    With the ``calibration_windows`` the scores came from, the sets of ``config.baselines`` (bi, angular) are
    screened beside the near-ties of ``scores``, each record naming its ``origin``; with their ``calibration``, the
    held-out windows skip every calibration window (``heldout_windows``).
    """
    windows = heldout_windows(dense, config, calibration)
    near_ties = candidate_sets(scores, n_remove, max(config.screen, config.sets), config.pool)
    baselines = {} if calibration_windows is None else baseline_sets(dense.model, calibration_windows, n_remove, config.baselines)
    merged = merged_candidates(near_ties, baselines)
    seqlen = windows.shape[1]
    screen_windows = windows[: max(1, config.screen_tokens // seqlen)]
    screened = screen_sets(dense, [removed for removed, _ in merged], screen_windows,
                           [origins for _, origins in merged] if baselines else None)
    best_screened = sorted(screened, key=lambda record: record["ppl_before"])
    outcome = {"first": near_ties[0], "screened": screened, "config": asdict(config), "baselines": baselines,
               "heldout": {"windows": len(windows), "screen_windows": len(screen_windows), "seqlen": seqlen}}
    if config.sets == 0:
        return {"chosen": best_screened[0]["removed"], **outcome, "candidates": []}
    probed = probe_sets(dense, best_screened[: config.sets], windows, config)
    best = min(probed, key=lambda record: record["ppl_after"])
    return {"chosen": best["removed"], **outcome, "candidates": probed}
