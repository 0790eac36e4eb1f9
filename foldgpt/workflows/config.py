"""The settings of ``foldgpt compress``: one section per stage's config, each declared beside the code that uses it.

Torch-free (``foldgpt compress --help`` is generated from it); the pipeline itself is ``foldgpt.workflows.compress``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from foldgpt.core.settings import section
from foldgpt.data.config import CalibrationConfig
from foldgpt.errors import FoldGPTError
from foldgpt.eval.config import PERPLEXITY_SETS, EvalConfig
from foldgpt.formats.config import GgufStageConfig, ModelConfig
from foldgpt.healing.config import HealConfig
from foldgpt.selection.config import (
    GATE_CALIBRATION_WINDOWS,
    PIPELINE_PROBE_SETS,
    GateConfig,
    ProbeConfig,
    SelectionConfig,
)
from foldgpt.surgery.config import RemovalTarget, ReplacementConfig, SharingConfig, TieConfig

COMPRESS_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande")
COMPRESS_TASK_LIMIT = 100


def compress_evaluation() -> EvalConfig:
    """The pipeline's evaluation: both perplexity sets on 16k tokens of 1,024-token windows, the five shipped tasks on
    100 documents each, and the efficiency figures (YAML / Python ``tasks: null``, ``efficiency: false`` skip them)."""
    return EvalConfig(ppl=PERPLEXITY_SETS, seqlen=1024, max_tokens=16384, tasks=COMPRESS_TASKS, limit=COMPRESS_TASK_LIMIT,
                      efficiency=True)


@dataclass(frozen=True)
class CompressConfig:
    """Every setting of the pipeline, by stage; ``DIR/config.yaml`` is ``to_mapping`` of it.

    Which stage depends on which section (and so which settings redo which stages) is ``foldgpt.workflows.compress
    .settings_for``. The probes' healing data, window length and seed are the heal's and their held-out text the
    calibration's (``probe_config``); the ``probe`` section holds only the user's settings (its window length is a
    placeholder of 1, so that it can be checked before the heal's is known).
    """

    loading: ModelConfig = section(ModelConfig, title="model", exclude=("device_map",),
                                   help="the dense model, its dtype and device (one process, one device)")
    selection: SelectionConfig = section(lambda: SelectionConfig(method="gates"), title="block removal",
                                         exclude=("granularity", "blocks"), help="the block-selection method")
    target: RemovalTarget = section(lambda: RemovalTarget(remove=6), title="block removal",
                                    help="how much to remove; a target given later (the command line) replaces an earlier one")
    calibration: CalibrationConfig = section(lambda: CalibrationConfig(nsamples=GATE_CALIBRATION_WINDOWS),
                                             title="calibration data (selection and analysis)",
                                             help="the text the blocks are chosen on (and the analysis runs on)")
    replacement: ReplacementConfig = section(ReplacementConfig, title="block removal",
                                             help="a linear map in place of each removed span (ReplaceMe)")
    gates: GateConfig = section(GateConfig, prefix="gate-", title="gate training (--method gates)",
                                help="the gates' training")
    probe: ProbeConfig = section(lambda: ProbeConfig(sets=PIPELINE_PROBE_SETS, seqlen=1), prefix="gate-probe-",
                                 title="screen and healing probes of the gates' near-ties (--method gates)",
                                 help="how the gates' near-tied sets are screened and probed")
    sharing: SharingConfig = section(lambda: SharingConfig(group_size=1), title="grouped sharing",
                                     help="grouped sharing of the kept blocks (group size 1, none, chosen by measurement: "
                                     "on SmolLM2-135M a shared model stays unusable after a CPU-sized healing budget, see "
                                     "README; use 2 with a GPU-sized budget, as the FoldGPT paper does)")
    ties: TieConfig = section(TieConfig, title="ties (--fold auto)", exclude=("ties",),
                              help="how --fold auto fits and compares its tie candidate")
    heal: HealConfig = section(HealConfig, prefix="heal-", title="healing (the settings of 'foldgpt heal')",
                               help="LoRA distillation healing from the dense model")
    eval: EvalConfig = section(compress_evaluation, title="evaluation (dense and final model)",
                               flags={"seqlen": "eval-seqlen"},  # --seqlen is the calibration's
                               help="what the dense and the final model are scored on")
    deploy: GgufStageConfig = section(GgufStageConfig, title="llama.cpp export (last stage)",
                                      help="the final model as a GGUF file")

    def __post_init__(self) -> None:
        if self.selection.method is None:
            raise FoldGPTError("compress needs a --method (default: gates)")
        if len(self.target.given()) != 1:  # checked now, not after the dense evaluation and the analysis
            raise FoldGPTError("give exactly one target: --remove N, --remove-ratio R, --target-params F or --target-flops F")
        self.probe_config()  # checked as it will run (its window length is the heal's, unknown to the section alone)

    @property
    def heals(self) -> bool:
        """``heal.steps`` 0 skips healing."""
        return self.heal.steps > 0

    @property
    def probes_heal(self) -> bool:
        """Whether the removal heals probes: only when the gates choose and the pipeline heals after (the probes pick
        the set that heals best; without healing see ``screens_only``)."""
        return self.selection.method == "gates" and self.heals and self.probe.sets > 0

    @property
    def screens_only(self) -> bool:
        """Whether the removal screens the gates' near-ties and heals none, as ``prune`` does by default: when the
        pipeline does not heal its output is judged before healing (``--gate-probe-screen 0``: the gates' own pick).
        A pipeline that heals with ``--gate-probe-sets 0`` keeps the gates' own pick."""
        return self.selection.method == "gates" and not self.heals and self.probe.screen > 0

    def fold_probe(self) -> HealConfig | None:
        """The heal ``--fold auto`` gives each candidate before comparing them (None: compared unhealed): the heal that
        follows, for ``--tie-probe-steps`` steps (default its whole budget); none when the pipeline does not heal."""
        if self.sharing.fold != "auto" or not self.heals or self.ties.probe_steps == 0:
            return None
        if self.ties.probe_steps is None:
            return self.heal
        return replace(self.heal, steps=self.ties.probe_steps, tokens=None)

    def probe_config(self) -> ProbeConfig | None:
        """The probe the removal runs (None: the method's own pick): scored on the calibration text, healing as the
        heal that follows will (a screen alone heals nothing, so it keeps the probe's own window length)."""
        if self.probes_heal:
            return replace(self.probe, eval_data=self.calibration.data, data=self.heal.data, seqlen=self.heal.seqlen,
                           seed=self.heal.seed)
        if self.screens_only:
            return replace(self.probe, sets=0, eval_data=self.calibration.data, data=self.heal.data, seed=self.heal.seed,
                           seqlen=ProbeConfig.seqlen)
        return None
