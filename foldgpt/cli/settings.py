"""The settings of each command, composed of the config dataclasses (``compress``'s is ``CompressConfig``).

Torch-free: the parsers are generated from these (``foldgpt.cli.schema``), and the commands read them back.
"""

from __future__ import annotations

from dataclasses import dataclass

from foldgpt.core.settings import section
from foldgpt.data.config import CalibrationConfig
from foldgpt.eval.config import EvalConfig
from foldgpt.formats.config import GgufConfig, ModelConfig, OffloadConfig
from foldgpt.healing.config import HealConfig
from foldgpt.selection.config import GATE_CALIBRATION_WINDOWS, PRUNE_SCREEN, GateConfig, ProbeConfig, SelectionConfig
from foldgpt.surgery.config import RemovalTarget, ReplacementConfig, SharingConfig, TieConfig

MODEL = "model"
CALIBRATION = "calibration data"
MEMORY = "memory (big models)"


@dataclass(frozen=True)
class AnalyzeSettings:
    loading: ModelConfig = section(ModelConfig, title=MODEL, exclude=("device_map",), help="the model to analyse")
    calibration: CalibrationConfig = section(CalibrationConfig, title=CALIBRATION, help="the text the blocks are measured on")
    offload: OffloadConfig = section(OffloadConfig, title=MEMORY, help="block-by-block analysis")


@dataclass(frozen=True)
class PruneSettings:
    """``calibration``'s default depends on the method (``foldgpt.selection.config.default_calibration``)."""

    loading: ModelConfig = section(ModelConfig, title=MODEL, help="the model to prune")
    selection: SelectionConfig = section(SelectionConfig, title="block selection", help="the method, or the blocks")
    target: RemovalTarget = section(RemovalTarget, title="block selection", help="how much to remove")
    calibration: CalibrationConfig = section(
        CalibrationConfig, title=CALIBRATION, help="the text the blocks are chosen on",
        shown={"nsamples": f"{GATE_CALIBRATION_WINDOWS} for --method gates, {CalibrationConfig().nsamples} for the others"})
    gates: GateConfig = section(GateConfig, prefix="gate-", title="gate training (--method gates)", help="the gates' training")
    probe: ProbeConfig = section(lambda: PRUNE_SCREEN, prefix="gate-probe-",
                                 title="screen and healing probes of the gates' near-ties (--method gates)",
                                 help="how the gates' near-tied sets are screened (and probed)")
    replacement: ReplacementConfig = section(ReplacementConfig, title="replacement of the removed blocks",
                                             help="a linear map in place of each removed span (ReplaceMe)")
    offload: OffloadConfig = section(OffloadConfig, title=MEMORY, help="block-by-block selection (bi, angular, sleb)")
    sharing: SharingConfig = section(SharingConfig, title="ties (--fold auto)", exclude=("group_size", "groups", "parent"),
                                     help="whether the removal is weighed against one block fewer plus ties")
    ties: TieConfig = section(TieConfig, title="ties (--fold auto)", exclude=("ties",),
                              help="how --fold auto fits and compares its tie candidate")


@dataclass(frozen=True)
class EvalSettings:
    loading: ModelConfig = section(ModelConfig, title=MODEL, exclude=("device_map",), help="the model to evaluate")
    eval: EvalConfig = section(EvalConfig, title="perplexity, tasks (lm-evaluation-harness, offline), efficiency",
                               help="what to evaluate")
    offload: OffloadConfig = section(OffloadConfig, title=MEMORY, help="block-by-block perplexity")


@dataclass(frozen=True)
class FoldSettings:
    loading: ModelConfig = section(ModelConfig, title=MODEL, exclude=("device_map",), help="the (pruned) model to fold")
    sharing: SharingConfig = section(SharingConfig, title="grouped sharing", help="the groups and their parents")
    ties: TieConfig = section(TieConfig, title="ties (instead of groups)",
                              help="neighbouring kept blocks tied with a fitted low-rank delta")


@dataclass(frozen=True)
class ExportSettings:
    loading: ModelConfig = section(ModelConfig, title=MODEL, exclude=("device_map",), help="the model to export")
    gguf: GgufConfig = section(GgufConfig, title="GGUF (--gguf)", help="the llama.cpp file")


@dataclass(frozen=True)
class HealSettings:
    loading: ModelConfig = section(ModelConfig, title=MODEL, exclude=("model",),
                                   help="how student and teacher are loaded (see --bf16 for mixed precision)")
    heal: HealConfig = section(HealConfig, title="healing", help="the healing")
