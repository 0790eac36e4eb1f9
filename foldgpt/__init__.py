"""foldgpt: make decoder-only LLMs shallower (FoldGPT, arXiv 2407.00928).

The Python API mirrors the CLI::

    import foldgpt
    loaded = foldgpt.load_model("smollm2-135m")
    stats = foldgpt.analyze(loaded)                      # Block Influence, similarity, angular distance
    foldgpt.prune(loaded, method="bi", remove=6, out="runs/bi6")
    folded = foldgpt.fold_model(foldgpt.load("runs/bi6"), group_size=2, out="runs/bi6-g2")  # compact folder
    foldgpt.export_plain(foldgpt.load("runs/bi6-g2"), "runs/bi6-g2-plain")                 # vanilla HF folder
    foldgpt.perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=1024, max_tokens=8192)
    foldgpt.evaluate_tasks(loaded.model, loaded.tokenizer, ["piqa", "arc_easy"], limit=100)  # lm-eval, offline
    foldgpt.measure_efficiency(loaded.model, loaded.source)  # parameters, disk, FLOPs, prefill/decode, peak memory
"""

__version__ = "0.1.0"

from foldgpt.analysis import RedundancyStats, analyze, redundancy_stats
from foldgpt.compress import compress
from foldgpt.data import CalibrationConfig
from foldgpt.efficiency import EfficiencyReport, measure_efficiency
from foldgpt.errors import FoldGPTError
from foldgpt.evaluation import PerplexityResult, perplexity
from foldgpt.folding import FoldResult, export_plain, fold_model
from foldgpt.healing import HealConfig, HealResult, heal
from foldgpt.importance.probe import PRUNE_SCREEN, ProbeConfig
from foldgpt.lm_tasks import TaskResults, evaluate_tasks
from foldgpt.models.loading import LoadedModel, load_model
from foldgpt.pruning import PruneResult, prune
from foldgpt.removal import remove_blocks

load = load_model
"""``foldgpt.load(DIR)``: any MODEL the CLI takes, including compact (folded or healed) folders."""

__all__ = [
    "PRUNE_SCREEN",
    "CalibrationConfig",
    "EfficiencyReport",
    "FoldGPTError",
    "FoldResult",
    "HealConfig",
    "HealResult",
    "LoadedModel",
    "PerplexityResult",
    "ProbeConfig",
    "PruneResult",
    "RedundancyStats",
    "TaskResults",
    "analyze",
    "compress",
    "evaluate_tasks",
    "export_plain",
    "fold_model",
    "heal",
    "load",
    "load_model",
    "measure_efficiency",
    "perplexity",
    "prune",
    "redundancy_stats",
    "remove_blocks",
]
