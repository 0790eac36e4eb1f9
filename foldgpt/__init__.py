"""foldgpt: make decoder-only LLMs shallower (FoldGPT, arXiv 2407.00928).

The Python API mirrors the CLI::

    import foldgpt
    loaded = foldgpt.load("smollm2-135m")
    stats = foldgpt.analyze(loaded)                      # Block Influence, similarity, angular distance
    foldgpt.prune(loaded, method="bi", remove=6, out="runs/bi6")
    folded = foldgpt.fold_model(foldgpt.load("runs/bi6"), group_size=2, out="runs/bi6-g2")  # compact folder
    tied = foldgpt.tie_model(foldgpt.load("runs/bi6"), loaded, foldgpt.TieConfig(ties="11:12"), out="runs/bi6-t")
    foldgpt.export_plain(foldgpt.load("runs/bi6-g2"), "runs/bi6-g2-plain")                 # vanilla HF folder
    foldgpt.perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=1024, max_tokens=8192)
    foldgpt.evaluate_tasks(loaded.model, loaded.tokenizer, ["piqa", "arc_easy"], limit=100)  # lm-eval, offline
    foldgpt.measure_efficiency(loaded.model, loaded.source)  # parameters, disk, FLOPs, prefill/decode, peak memory
    foldgpt.compress("smollm2-135m", "runs/main", gate_steps=40, heal={"steps": 50})  # the whole pipeline, resumable

The names are imported on first use (PEP 562), so ``import foldgpt`` and ``foldgpt --help`` stay fast; nothing in
the package imports this module back. Type checkers and editors read the names from ``__init__.pyi``.
"""

from __future__ import annotations

import importlib
from typing import Any

from foldgpt._version import __version__

_EXPORTS = {
    "PRUNE_SCREEN": "foldgpt.selection.config",
    "CalibrationConfig": "foldgpt.data.config",
    "CompressConfig": "foldgpt.workflows.config",
    "EfficiencyReport": "foldgpt.eval.efficiency",
    "FoldGPTError": "foldgpt.errors",
    "FoldResult": "foldgpt.workflows.fold",
    "GateConfig": "foldgpt.selection.config",
    "HealConfig": "foldgpt.healing.config",
    "HealResult": "foldgpt.healing.loop",
    "LoadedModel": "foldgpt.formats.loading",
    "PerplexityResult": "foldgpt.eval.perplexity",
    "ProbeConfig": "foldgpt.selection.config",
    "PruneResult": "foldgpt.workflows.prune",
    "RedundancyStats": "foldgpt.analysis.redundancy",
    "ReplacementConfig": "foldgpt.surgery.config",
    "TaskResults": "foldgpt.eval.lm_tasks",
    "TieConfig": "foldgpt.surgery.config",
    "analyze": "foldgpt.workflows.analyze",
    "compress": "foldgpt.workflows.compress",
    "evaluate_tasks": "foldgpt.eval.lm_tasks",
    "export_plain": "foldgpt.formats.plain",
    "fold_auto": "foldgpt.workflows.fold_plan",
    "fold_model": "foldgpt.workflows.fold",
    "heal": "foldgpt.healing.loop",
    "load_model": "foldgpt.formats.loading",
    "measure_efficiency": "foldgpt.eval.efficiency",
    "perplexity": "foldgpt.eval.perplexity",
    "prune": "foldgpt.workflows.prune",
    "redundancy_stats": "foldgpt.analysis.redundancy",
    "remove_blocks": "foldgpt.surgery.removal",
    "tie_model": "foldgpt.workflows.fold",
}
_ALIASES = {"load": "load_model"}
"""``foldgpt.load(DIR)``: any MODEL the CLI takes, including compact (folded or healed) folders."""

__all__ = [
    "PRUNE_SCREEN",
    "CalibrationConfig",
    "CompressConfig",
    "EfficiencyReport",
    "FoldGPTError",
    "FoldResult",
    "GateConfig",
    "HealConfig",
    "HealResult",
    "LoadedModel",
    "PerplexityResult",
    "ProbeConfig",
    "PruneResult",
    "RedundancyStats",
    "ReplacementConfig",
    "TaskResults",
    "TieConfig",
    "__version__",
    "analyze",
    "compress",
    "evaluate_tasks",
    "export_plain",
    "fold_auto",
    "fold_model",
    "heal",
    "load",
    "load_model",
    "measure_efficiency",
    "perplexity",
    "prune",
    "redundancy_stats",
    "remove_blocks",
    "tie_model",
]


def __getattr__(name: str) -> Any:
    target = _ALIASES.get(name, name)
    if target not in _EXPORTS:
        raise AttributeError(f"module 'foldgpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[target]), target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

