"""Settings of the selection methods that have any: FoldGPT's gates, and the screen / healing probes of their near-ties."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from foldgpt.data.config import CalibrationConfig
from foldgpt.errors import FoldGPTError

LOSSES = ("kl", "lm")


CENTERS = ("mean", "target")


OPTIMIZERS = ("adam", "sgd")


GRANULARITIES = ("block", "sublayer")


@dataclass(frozen=True)
class GateConfig:
    """Hyper-parameters of gate training.

    Defaults were chosen on SmolLM2-135M with ``research/tune_gates.py`` (removing 6 blocks, perplexity on WikiText-2
    and PTB *validation* text): budget control on (``lam_growth=0.1``) and 80 steps beat a fixed ``lam=0.5`` (60
    steps) and the variants ``lam_growth=0.05`` with 120 steps and ``t=2``; results in
    ``research/results/tune_gates.json``.

    ``lam`` weighs the polarization regulariser against the distillation loss and ``t`` its pull towards 0; with
    ``t = 1`` an open gate above the mean feels almost no pull, while a gate below the mean is pushed down with
    weight ``t + 1``. Each step sees ``micro_batch * grad_accum`` calibration windows (per process, under a
    launcher). ``loss`` is ``"kl"`` (KL(teacher || gated model) on next-token distributions at ``temperature``) or
    ``"lm"`` (next-token cross-entropy on the calibration text). After each step the gates are clamped to ``[0, max_gate]``.

    Budget control (the paper's FLOPs constraint): with ``lam_growth > 0`` and a removal target, ``lam`` is multiplied
    by ``1 + lam_growth`` after every step in which fewer gates than the target are closed (below ``closed_below``)
    and divided by it when more are, so the regulariser's strength finds the level at which the target number of
    blocks switches off jointly, whatever the loss scale of the model. It overshoots: on SmolLM2 the closed count
    swings between 0 and about 15 with a period of some 25 steps. ``lam_damping < 1`` multiplies the growth by it at
    every reversal so that ``lam`` settles; ``polarization_center="target"`` splits the regulariser at the removal
    target instead of the mean (``target_center``). Neither is the default: on three calibration draws neither
    chose better blocks on validation text (docs/results/gate-stability.md).

    ``optimizer="sgd"`` (momentum 0.9) makes a gate's step scale with its gradient instead of Adam's per-gate
    normalisation, which moves every gate at about ``lr`` whatever its gradient. ``hard_steps > 0`` runs the last
    ``hard_steps`` of the ``steps`` with the blocks the target would remove now really removed (``hard_removal_mask``:
    a 0/1 mask in the forward, the gradient passed straight through to the gates, ``lam`` held), so that the loss is
    that of removal rather than of scaling. Neither is the default: both chose worse blocks on validation text (docs/results/gate-stability.md).

    ``restarts > 1`` trains the gates that many times from scratch on the same windows (run ``k`` with seed
    ``seed + k``, so another window order) and removes by ``ensemble_gates``: each run's gates averaged over its last
    quarter, then over the runs. Why: the budget controller leaves a run on one of several near-tied sets, depending
    on where its swings stop; the average keeps what the runs agree on. It costs ``restarts`` times the training.
    The default of 3 was chosen on validation text with 64 calibration windows: it removed blocks 4 5 13 14 25 26 for
    a 6-block target and 4 5 14 26 for 4, better than one run and than Block Influence there
    (docs/results/gate-stability.md).

    ``lora_rank > 0`` (ours, beyond the paper) makes the gates heal-aware: every projection of every block gets a LoRA
    adapter of that rank (peft; ``lora_alpha = 2 * rank``, as healing's default 8/16) that trains with the gates at
    ``lora_lr``, and the teacher runs with the adapters off. A block whose loss the other blocks can learn to make up
    for can then close, which is what healing later does; frozen weights rank the blocks by the damage before any
    healing. The adapters are discarded after (gates rank, they do not ship); the cost is LoRA's share of the backward.
    Not the default: on SmolLM2 the adapters also made up for gates that all shrink a little, so the gates stopped
    polarizing, and the blocks removed healed worse than the plain gates' (docs/results/heal-aware-gates.md).
    """

    steps: int = 80
    lr: float = 0.05
    lam: float = 0.5
    t: float = 1.0
    micro_batch: int = 1
    grad_accum: int = 1
    loss: str = "kl"
    gradient_checkpointing: bool = False
    temperature: float = 1.0
    max_gate: float = 1.0
    lam_growth: float = 0.1
    lam_damping: float = 1.0
    polarization_center: str = "mean"
    closed_below: float = 0.5
    optimizer: str = "adam"
    hard_steps: int = 0
    restarts: int = 3
    lora_rank: int = 0
    lora_lr: float = 5e-3

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> GateConfig:
        """The config named by CLI / ``compress`` settings: ``--gate-steps`` is ``settings["gate_steps"]``, and so on."""
        return cls(steps=settings["gate_steps"], lr=settings["gate_lr"], lam=settings["gate_lambda"],
                   lam_growth=settings["gate_lambda_growth"], lam_damping=settings["gate_lambda_damping"],
                   polarization_center=settings["gate_center"], t=settings["gate_t"], loss=settings["gate_loss"],
                   micro_batch=settings["gate_micro_batch"], grad_accum=settings["gate_grad_accum"],
                   optimizer=settings["gate_optimizer"], hard_steps=settings["gate_hard_steps"],
                   restarts=settings["gate_restarts"], lora_rank=settings["gate_lora_rank"],
                   lora_lr=settings["gate_lora_lr"],
                   gradient_checkpointing=settings["gradient_checkpointing"])

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise FoldGPTError(f"unknown gate loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise FoldGPTError(f"unknown gate optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.hard_steps <= self.steps:
            raise FoldGPTError(f"gate training needs 0 <= hard_steps <= steps, got hard_steps={self.hard_steps}, steps={self.steps}")
        if self.polarization_center not in CENTERS:
            raise FoldGPTError(f"unknown polarization center '{self.polarization_center}'; choose one of {', '.join(CENTERS)}")
        for name in ("steps", "micro_batch", "grad_accum", "restarts"):
            if getattr(self, name) < 1:
                raise FoldGPTError(f"gate training needs {name} >= 1, got {getattr(self, name)}")
        if self.lam_growth < 0:
            raise FoldGPTError(f"gate training needs lam_growth >= 0, got {self.lam_growth}")
        if not 0 < self.lam_damping <= 1:
            raise FoldGPTError(f"gate training needs 0 < lam_damping <= 1, got {self.lam_damping}")
        if self.lora_rank < 0:
            raise FoldGPTError(f"gate training needs lora_rank >= 0 (0 = no adapters), got {self.lora_rank}")
        for name in ("temperature", "max_gate", "lora_lr"):
            if not getattr(self, name) > 0:
                raise FoldGPTError(f"gate training needs {name} > 0, got {getattr(self, name)}")


PIPELINE_PROBE_SETS = 3
"""``foldgpt compress``'s default ``sets``: the pipeline heals, so it picks its set by healing (``prune``'s default
is ``PRUNE_SCREEN``: its output is judged before healing, so it picks by the screen alone)."""


@dataclass(frozen=True)
class ProbeConfig:
    """How many candidate sets to probe (0 = off: keep the method's own set) and how long and where to probe them.

    Defaults measured on SmolLM2-135M (docs/results/healing-probes.md): 8-step probes scored on 8,192
    tokens ordered the 6-block sets right but picked a 4-block set that the full heal put last; probes of the full
    25 steps scored on 32,768 tokens order the 4-block sets as the full heal does on the test split and keep the
    6-block pick. The screen stays on the first 8,192 tokens (24 forward passes of 32k would cost more than the probes).

    ``baselines``: the sets these methods choose on the same calibration windows join the gates' near-ties among the
    screened candidates, so the screen can only remove the gates' set where it really scores lower than the
    baselines' on held-out text (on Gemma-3-270M every near-tie of the gates held the last blocks, whose joint removal
    is ruinous: docs/results/gate-selection.md). The held-out text never overlaps a calibration window.
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
    baselines: tuple[str, ...] = ("bi", "angular")

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
        object.__setattr__(self, "baselines", tuple(self.baselines))
        unknown = [name for name in self.baselines if name not in BASELINE_CANDIDATES]
        if unknown:
            raise FoldGPTError(f"unknown baseline candidate(s) {', '.join(unknown)}; choose among "
                               f"{', '.join(BASELINE_CANDIDATES)}")
        for name in ("eval_tokens", "screen_tokens"):
            if getattr(self, name) < self.seqlen:
                raise FoldGPTError(f"healing probes score at least one window: {name} ({getattr(self, name)}) must be >= "
                                   f"seqlen ({self.seqlen})")


BASELINE_CANDIDATES = ("bi", "angular", "sleb")
"""Methods whose sets join the gates' near-ties as screen candidates (``ProbeConfig.baselines``): the screen then
removes the gates' choice only where it really scores lower than theirs (docs/results/gate-selection.md). SLEB costs
``n_remove * blocks`` calibration passes, so it is off by default."""

PRUNE_SCREEN = ProbeConfig(sets=0, screen=24)
"""``foldgpt prune --method gates``'s default: screen the 24 sets nearest the gates' pick on held-out text and remove
the lowest, no healing. On SmolLM2 (validation text the screen never saw: WikiText-2 validation after the screened
tokens and PTB validation; ``research/gate_screen.py``) it lowered the mean log perplexity at 4 and 6 blocks and on
average over 4, 6 and 8; on the test split only at 4, where it takes PTB below angular distance's
(docs/results/gate-screen.md)."""


GATE_CALIBRATION_WINDOWS = 64
"""Default calibration windows for ``--method gates``: gate training draws one window per step (80 by default), so
with the usual 16 (or 8) windows it sees each window five or ten times and its choice follows the draw; with 64 it
sees most once, at the same cost. On SmolLM2 (6 blocks, three draws, validation text) that cut the spread of the
chosen sets' mean log perplexity from 0.26 to 0.05 (docs/results/gate-stability.md)."""


def default_calibration(method: str | None = None) -> CalibrationConfig:
    """The calibration a method uses when none is given: ``GATE_CALIBRATION_WINDOWS`` windows for the gates, whose cost
    does not grow with them, and ``CalibrationConfig()`` (16) for the scoring methods."""
    return CalibrationConfig(nsamples=GATE_CALIBRATION_WINDOWS) if method == "gates" else CalibrationConfig()
