"""Settings of block selection: the method, FoldGPT's gates, and the screen / healing probes of their near-ties."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from foldgpt.core.settings import setting
from foldgpt.data.config import CalibrationConfig
from foldgpt.errors import FoldGPTError

Method = Literal["gates", "bi", "angular", "sleb", "last", "random"]
METHOD_NAMES = get_args(Method)
"""The selection methods (``foldgpt.selection.registry.METHODS`` holds their code under these names)."""

GateLoss = Literal["kl", "lm"]
LOSSES = get_args(GateLoss)

Center = Literal["mean", "target"]
CENTERS = get_args(Center)

Optimizer = Literal["adam", "sgd"]
OPTIMIZERS = get_args(Optimizer)

Readout = Literal["final", "on-target"]
READOUTS = get_args(Readout)

Granularity = Literal["block", "sublayer"]
GRANULARITIES = get_args(Granularity)


@dataclass(frozen=True)
class SelectionConfig:
    """Which blocks go: chosen by a method (how many: ``RemovalTarget``), or given."""

    method: Method | None = setting(None, none_means="required unless {blocks} is given",
                                    help="gates: FoldGPT learned gates (see the gate options); bi: ShortGPT Block Influence; "
                                    "angular: best contiguous span (Gromov et al.); sleb: greedy by calibration perplexity "
                                    "(SLEB); last: the last N before the final block; random: seeded control")
    granularity: Granularity = setting("block", help="block: one gate per block; sublayer: --method gates only, one gate on "
                                       "the attention and one on the MLP of each block, so an attention or an MLP can go alone "
                                       "(a block whose two both go is removed); --remove N then counts sub-layers, "
                                       "--target-params/--target-flops remove the fewest sub-layers by ascending gate that "
                                       "meet the budget")
    blocks: str | None = setting(None, metavar="SPEC", help="instead of {method} and a target: remove exactly these blocks, "
                                 "e.g. '4,5,14,26' or '13-18' (to reproduce a set another tool or paper reports)")

    def __post_init__(self) -> None:
        if self.blocks is not None and self.method is not None:
            raise FoldGPTError("--blocks names the blocks to remove: give it without --method and a target")


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

    ``readout`` is where on each run's trajectory the gates are read: ``"final"`` takes the last step's gates (with
    restarts, ``ensemble_gates``: each run's last quarter averaged); ``"on-target"`` averages each run's gates over
    the steps of its second half at which exactly the target's blocks were closed (budget control's verdict "on
    target"; a run that never was falls back to its last quarter). Why: budget control swings the closed count
    through the target and back, and on Gemma-3-270M every restart ended in a trough with half-open gates, so the
    final readout ranked dimming rather than removal (docs/results/gate-selection.md).

    ``lora_rank > 0`` (ours, beyond the paper) makes the gates heal-aware: every projection of every block gets a LoRA
    adapter of that rank (peft; ``lora_alpha = 2 * rank``, as healing's default 8/16) that trains with the gates at
    ``lora_lr``, and the teacher runs with the adapters off. A block whose loss the other blocks can learn to make up
    for can then close, which is what healing later does; frozen weights rank the blocks by the damage before any
    healing. The adapters are discarded after (gates rank, they do not ship); the cost is LoRA's share of the backward.
    Not the default: on SmolLM2 the adapters also made up for gates that all shrink a little, so the gates stopped
    polarizing, and the blocks removed healed worse than the plain gates' (docs/results/heal-aware-gates.md).
    """

    steps: int = setting(80, help="optimiser steps")
    lr: float = setting(0.05, help="learning rate of the gates")
    lam: float = setting(0.5, flag="lambda", help="weight of the FLOPs-weighted polarization regulariser (where budget "
                         "control starts it)")
    t: float = setting(1.0, help="the regulariser's pull towards 0, t")
    micro_batch: int = setting(1, help="calibration windows per forward pass")
    grad_accum: int = setting(1, help="micro-batches per optimiser step")
    loss: GateLoss = setting("kl", help="kl: KL(dense model || gated model) on logits; lm: next-token loss")
    gradient_checkpointing: bool = setting(False, flag="--gradient-checkpointing",
                                           help="recompute block activations in backward to save memory (gate training)")
    temperature: float = setting(1.0, help="temperature of the KL loss")
    max_gate: float = setting(1.0, help="the gates are clamped to [0, this] after each step")
    lam_growth: float = setting(0.1, flag="lambda-growth",
                                help="budget control: grow (shrink) lambda by this factor after each step with too few (many) "
                                "closed gates, so that the target number of blocks switches off (0 = off)")
    lam_damping: float = setting(1.0, flag="lambda-damping",
                                 help="budget control: multiply the growth by this each time the controller turns back (it "
                                 "overshot), so lambda settles instead of swinging (1 = constant growth)")
    polarization_center: Center = setting("mean", flag="center",
                                          help="split point of the polarization regulariser: mean (Zhuang et al.: every gate "
                                          "below the mean is pushed to 0) or target (only the gates the removal target would "
                                          "take now are pushed)")
    closed_below: float = setting(0.5, help="a gate below this counts as closed for budget control")
    optimizer: Optimizer = setting("adam", help="adam, or sgd with momentum 0.9, whose steps scale with the gradient (give "
                                   "it a larger {lr}, e.g. 0.15)")
    hard_steps: int = setting(0, help="the last N of the {steps} run the model with the blocks the target would remove now "
                              "really removed (a 0/1 mask, straight-through gradient to the gates), lambda held (0 = off)")
    restarts: int = setting(3, help="train the gates this many times (seeds SEED, SEED+1, ...: other window orders) and "
                            "remove by their average over the last quarter of every run; costs that many times the training")
    readout: Readout = setting("final", help="where each run's gates are read: final (the last step; with restarts the "
                               "average of each run's last quarter) or on-target (the average over the steps of the run's "
                               "second half at which exactly the target's blocks were closed; the last quarter if none)")
    lora_rank: int = setting(0, help="heal-aware gates: LoRA adapters of this rank on every projection train with the gates "
                             "(the teacher runs without them) and are discarded after, so blocks the others can learn to "
                             "make up for close (0 = off)")
    lora_lr: float = setting(5e-3, help="learning rate of those adapters")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise FoldGPTError(f"unknown gate loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise FoldGPTError(f"unknown gate optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.hard_steps <= self.steps:
            raise FoldGPTError(f"gate training needs 0 <= hard_steps <= steps, got hard_steps={self.hard_steps}, steps={self.steps}")
        if self.readout not in READOUTS:
            raise FoldGPTError(f"unknown gate readout '{self.readout}'; choose one of {', '.join(READOUTS)}")
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

    The probes score on the calibration text's held-out split (``eval_data``, set to ``--calibration``), and in
    ``compress`` they heal as the heal that follows will (its data, window length and seed), so that they measure
    it; those fields are set by the code, not by the user.

    ``baselines``: the sets these methods choose on the same calibration windows join the gates' near-ties among the
    screened candidates, so the screen can only remove the gates' set where it really scores lower than the
    baselines' on held-out text (on Gemma-3-270M every near-tie of the gates held the last blocks, whose joint removal
    is ruinous: docs/results/gate-selection.md). The held-out text never overlaps a calibration window.
    """

    sets: int = setting(0, help="healing probes: heal the K best-screened sets near the gates' pick for {steps} steps "
                        "each and remove the one that heals best (perplexity on held-out calibration text); costs K heals; "
                        "0 = no heals: remove the best-screened set (compress heals no probes with --heal-steps 0)")
    screen: int = setting(24, help="screen this many sets nearest the gates' pick by held-out perplexity (the calibration "
                          "text's held-out split) without healing; the probes heal the best of them, or with {sets} 0 the "
                          "best is removed (0 and 0: the gates' own pick)")
    pool: int = setting(3, help="the candidates draw from the N + this many lowest gates, N = blocks to remove")
    steps: int = setting(25, help="healing steps per probe (the default heal's whole budget)")
    seqlen: int = setting(1024, internal=True, help="tokens per probe healing window (compress: the heal's)")
    data: str = setting("alpaca", internal=True, help="the probes' healing data (compress: the heal's)")
    eval_data: str = setting("wikitext2", internal=True, help="the text whose held-out split the sets are scored on "
                             "(the calibration's)")
    eval_tokens: int = setting(32768, flag="tokens", help="held-out tokens each probe is scored on after its heal; the "
                               "screen uses the first 8192")
    screen_tokens: int = setting(8192, internal=True, help="held-out tokens the screen scores each set on")
    seed: int = setting(0, internal=True, help="seed of the probes' heals (compress: the heal's)")
    baselines: tuple[str, ...] = setting(("bi", "angular"), metavar="METHODS",
                                         help="the sets these methods choose on the same calibration windows are screened "
                                         "beside the gates' near-ties (bi, angular, sleb; sleb costs N x blocks calibration "
                                         "passes); the held-out text skips every calibration window")

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
