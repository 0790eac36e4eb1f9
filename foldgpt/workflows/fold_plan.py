"""``--fold auto``: removal only, against removing one block fewer and tying kept neighbours, chosen on held-out text.

At a parameter budget, removal alone takes ``k`` blocks. The tie candidate keeps the removed block of highest Block
Influence, removes the other ``k - 1``, and ties as few kept neighbours (the most redundant first, by Block
Influence) as the budget needs; each tie is fitted by local reconstruction (``foldgpt.healing.ties``). Both
candidates are healed briefly, as the heal that follows will heal them, and scored by perplexity on windows of the
fitting text that no fitting window overlaps. The ties are written only where they are lower by ``--tie-margin``
(they run one block more per token), so ``auto`` is never worse than removal only, after that heal, on the text it
scores. docs/results/tie-init.md and fold-vs-remove.md have the measurements behind
the construction.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from copy import deepcopy as copy_module
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from foldgpt.analysis.redundancy import redundancy_stats
from foldgpt.arch.adapters import adapter_for
from foldgpt.core.outputs import atomic_output_dir
from foldgpt.data.text import load_text
from foldgpt.data.windows import calibration_starts, calibration_windows, tokenize, windows_avoiding
from foldgpt.errors import FoldGPTError
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.compact import save_compact
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.healing.save import save_healed
from foldgpt.surgery.config import TieConfig
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.ties import tie_candidates, tie_saving
from foldgpt.workflows.fold import FoldResult, fold_model, tie_model


def tie_plan_for_budget(dense: torch.nn.Module, removed: Sequence[int], influence: Sequence[float], rank: int,
                        budget: int) -> tuple[list[int], tuple[tuple[int, int], ...]] | None:
    """The tie candidate of a removal: ``removed`` less its block of highest influence, and the fewest ties (most
    redundant kept blocks first) that bring the unique parameters to ``budget`` or below; None if none does."""
    if not removed:
        return None
    layers = adapter_for(dense).layers(dense)
    num_blocks = len(layers)
    restored = max(removed, key=lambda index: influence[index])
    fewer = sorted(set(removed) - {restored})
    ranking = sorted(range(num_blocks), key=lambda index: influence[index])
    base = count_parameters(dense) - sum(count_parameters(layers[index]) for index in fewer)
    for count in range(1, num_blocks):
        ties = tie_candidates(ranking, fewer, count, num_blocks)
        if len(ties) < count:
            return None
        if base - sum(tie_saving(layers[child], rank) for _, child in ties) <= budget:
            return fewer, ties
    return None


def fit_and_check_windows(tokenizer: Any, config: TieConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of ``config.data`` the ties are fitted on, and the held-out windows (none overlapping a fitting
    window) on which ``--fold auto`` compares its candidates."""
    tokens = tokenize(tokenizer, load_text(config.data, "calibration"))
    windows = calibration_windows(tokens, config.fit_windows, config.fit_seqlen, config.seed)
    spans = [(s, s + config.fit_seqlen) for s in calibration_starts(len(tokens), config.fit_windows, config.fit_seqlen, config.seed)]
    held_out = windows_avoiding(tokens, config.check_seqlen, config.check_tokens, spans)
    if len(held_out) == 0:
        raise FoldGPTError(f"--tie-data '{config.data}' has no text left beside the fitting windows; use a longer text "
                           "or fewer --tie-fit-windows")
    return windows, held_out


def fold_auto(pruned: LoadedModel, dense: LoadedModel, fresh: LoadedModel, removed: Sequence[int], config: TieConfig,
              out: str | Path | None = None, overwrite: bool = False, probe: HealConfig | None = None,
              source_metadata: dict | None = None) -> FoldResult:
    """Write removal only (``pruned``, which removed ``removed`` from ``dense``) or, where its perplexity is lower by
    ``config.margin``, its tie candidate (built on ``fresh``, a second copy of the dense model) at ``pruned``'s unique
    parameters; both scores are in ``foldgpt.json`` under ``fold_candidates``.

    With ``probe`` (a heal of one step or more), each candidate is first healed by it from ``dense``, as written to
    disk, and the scores after that heal decide: before healing the ties can lead by a margin that healing erases
    (docs/results/fold-vs-remove.md). Without it the unhealed scores decide.

    ``source_metadata`` is the removal's own ``foldgpt.json`` when ``pruned`` was never written (``prune --fold
    auto`` prunes in memory); it becomes the written folder's ``source_metadata``, so the lineage is kept."""
    if fresh.model is dense.model:
        raise FoldGPTError("fold_auto needs a second copy of the dense model to build the tie candidate on")
    windows, held_out = fit_and_check_windows(dense.tokenizer, config)
    budget = count_parameters(pruned.model)
    influence = redundancy_stats(dense.model, windows).block_influence
    removal = fold_model(pruned, group_size=1)
    candidates: list[dict[str, Any]] = [{"name": "remove", "removed": sorted(removed), "ties": [], "unique_parameters": budget,
                                         "perplexity": windows_perplexity(pruned.model, held_out, progress=False)}]
    plan = tie_plan_for_budget(dense.model, removed, influence, config.rank, budget)
    tied = None
    if plan is not None:
        fewer, ties = plan
        remove_blocks(fresh.model, fewer)
        spec = ",".join(f"{parent}:{child}" for parent, child in ties)
        tied = tie_model(fresh, dense, replace(config, ties=spec), removed=fewer)
        candidates.append({"name": "ties", "removed": fewer, "ties": [list(tie) for tie in ties],
                           "unique_parameters": tied.report.unique,
                           "perplexity": windows_perplexity(tied.loaded.model, held_out, progress=False)})
    judged = "perplexity"
    with tempfile.TemporaryDirectory(prefix="foldgpt-fold-auto-") as scratch:
        scored: dict[str, Any] = {"fold_judged": "unhealed"}
        if probe is not None and probe.steps > 0 and tied is not None:
            judged = "perplexity_healed"
            tied.loaded = save_healed(tied.loaded, Path(scratch) / "ties", tied.metadata)
            # the teacher runs on the fly, as in the heal that follows: a cache holds float16 logits (16 GB for a heal
            # of Gemma-3's 262k-token vocabulary)
            run = replace(probe, checkpoint_every=0, eval_every=0)
            for candidate, result in zip(candidates, (removal, tied)):
                candidate[judged] = healed_perplexity(result.loaded, dense, held_out, run)
            scored = {"fold_judged": "after a probe heal", "fold_probe": asdict(probe)}
        best = candidates[0]  # removal, unless the ties are lower by the margin
        if len(candidates) == 2 and candidates[1][judged] < (1 - config.margin) * candidates[0][judged]:
            best = candidates[1]
        scored.update({"fold_candidates": candidates, "fold_choice": best["name"], "fold_margin": config.margin,
                       "fold_check_tokens": int(held_out.numel())})
        chosen = removal if best["name"] == "remove" else tied
        assert chosen is not None
        chosen.metadata.update(scored)
        if source_metadata is not None:
            chosen.metadata["source_metadata"] = source_metadata
        if out is not None and chosen is removal:
            with atomic_output_dir(Path(out), overwrite) as folder:
                save_compact(removal.loaded.model, removal.loaded.tokenizer, folder, removal.metadata)
        elif out is not None:
            chosen.loaded = save_healed(chosen.loaded, Path(out), chosen.metadata, overwrite=overwrite)
    return chosen


def healed_perplexity(candidate: LoadedModel, dense: LoadedModel, held_out: torch.Tensor, probe: HealConfig) -> float:
    """``candidate``'s perplexity on ``held_out`` after ``probe`` heals a copy of it from ``dense`` (``candidate`` is
    left as it was, to be written if chosen)."""
    copy = LoadedModel(model=copy_module(candidate.model), tokenizer=candidate.tokenizer, source=candidate.source)
    healed = heal(copy, dense, probe).loaded
    return windows_perplexity(healed.model, held_out, progress=False)
