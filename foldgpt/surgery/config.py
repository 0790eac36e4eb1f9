"""How much to remove and how to share: the removal target and the grouping of the kept blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from foldgpt.core.settings import setting
from foldgpt.errors import FoldGPTError

TARGET_FIELDS = ("remove", "remove_ratio", "target_params", "target_flops")

Parent = Literal["first", "middle", "largest-gate"]
PARENTS = get_args(Parent)
FoldMode = Literal["off", "auto"]
FOLD_MODES = get_args(FoldMode)


@dataclass(frozen=True)
class RemovalTarget:
    """Exactly one of the four ways to say how much to remove (``foldgpt.surgery.budget`` turns it into blocks)."""

    remove: int | None = setting(None, metavar="N", exclusive="target",
                                 help="number of blocks to remove (1 .. blocks-1); with --granularity sublayer, sub-layers")
    remove_ratio: float | None = setting(None, metavar="R", exclusive="target",
                                         help="fraction of blocks to remove, 0 < R < 1 (rounded)")
    target_params: float | None = setting(None, metavar="F", exclusive="target",
                                          help="keep at most a fraction F of the model's parameters (embeddings included), "
                                          "e.g. 0.75; compress counts the sharing too")
    target_flops: float | None = setting(None, metavar="F", exclusive="target",
                                         help="keep at most a fraction F of the forward FLOPs per token (at context 2048), e.g. 0.75")
    flops_context: int = setting(2048, internal=True, help="context length at which FLOPs per token are counted")

    def given(self) -> list[str]:
        return [name for name in TARGET_FIELDS if getattr(self, name) is not None]


@dataclass(frozen=True)
class SharingConfig:
    """Grouped sharing: contiguous groups of blocks, each sharing one parent's linear weights."""

    group_size: int | None = setting(None, metavar="G", exclusive="grouping",
                                     help="G consecutive blocks per group sharing one parent's weights (the last may be "
                                     "shorter); 1 = no sharing")
    groups: str | None = setting(None, metavar="SPEC", exclusive="grouping",
                                 help="explicit contiguous groups over the blocks instead, e.g. '0-3,4-5,6-11,...', covering "
                                 "every block once")
    parent: Parent = setting("first", help="which block of a group lends its weights: first, middle, or largest-gate (the "
                             "block whose learned gate stayed most open; the model must come from 'foldgpt prune --method gates')")

    fold: FoldMode = setting("off", help="off: the groups above (prune: removal only); auto (fold: on a pruned folder): the "
                             "removal against removing one block fewer and tying kept neighbours with fitted deltas at "
                             "the same unique parameters (the --tie-* settings), each healed first, the ties written "
                             "only where lower on held-out --tie-data text by --tie-margin; a compact folder "
                             "(docs/results/fold-vs-remove.md)")

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise FoldGPTError(f"--group-size {self.group_size} is out of range; use 1 (no sharing) or more")
        if self.fold not in FOLD_MODES:
            raise FoldGPTError(f"unknown --fold '{self.fold}'; choose one of {', '.join(FOLD_MODES)}")
        if self.fold == "auto" and ((self.group_size or 1) > 1 or self.groups):
            raise FoldGPTError("--fold auto plans its own ties; drop --group-size/--groups (or use --fold off)")


Replace = Literal["none", "linear"]
REPLACE_MODES = get_args(Replace)
Objective = Literal["lstsq", "cosine"]
OBJECTIVES = get_args(Objective)


@dataclass(frozen=True)
class ReplacementConfig:
    """What stands in for each removed span: nothing (plain removal), or a linear map fitted on the calibration windows
    and folded into the MLP output projection of the kept block before it (ReplaceMe; ``foldgpt.surgery.replacement``)."""

    replace: Replace = setting("none", flag="--replace",
                               help="none: the removed blocks are simply gone; linear: each contiguous removed span is "
                               "replaced by a d x d map, fitted by least squares on the calibration windows and folded "
                               "into the down projection of the kept block before it (ReplaceMe): no training, no extra "
                               "parameter, still a vanilla folder (not Gemma 2/3, post-LN OPT, or a span at block 0)")
    nsamples: int = setting(16, flag="--replace-nsamples", metavar="N",
                            help="with {replace} linear: the calibration windows the maps are fitted on (the calibration's "
                            "text and --seed; a map has d x d unknowns, so it wants more tokens than scoring)")
    seqlen: int = setting(1024, flag="--replace-seqlen", metavar="N",
                          help="with {replace} linear: tokens per fitting window (long windows: the map sees late "
                          "positions, and the first tokens' outsized states weigh less in the fit)")
    ridge: float = setting(1e-4, flag="--replace-ridge", metavar="R",
                           help="with {replace} linear: the ridge term of the fit, as a fraction of the mean eigenvalue "
                           "of the MLP outputs' Gram matrix")
    check_tokens: int = setting(4096, flag="--replace-check-tokens", metavar="N",
                                help="with {replace} linear: score the pruned model with and without the maps on N tokens "
                                "of the calibration text that no fitting or selection window overlaps, and keep plain "
                                "removal (with a warning) where the maps make it worse; 0 skips the check (always with "
                                "--offload blocks)")
    objective: Objective = setting("lstsq", flag="--replace-objective",
                                   help="lstsq: the ridge least-squares map; cosine: that map refined by Adam to minimise "
                                   "the cosine distance between the replaced and the dense stream (ReplaceMe's best "
                                   "variant; holds the span's activations in memory; on SmolLM2 it helped one long span "
                                   "and hurt bi's short ones, docs/results/replacement.md)")
    cosine_steps: int = setting(300, flag="--replace-cosine-steps", metavar="N",
                                help="with {objective} cosine: full-batch Adam steps per span")
    cosine_lr: float = setting(1e-3, flag="--replace-cosine-lr", metavar="X",
                               help="with {objective} cosine: Adam's learning rate")

    def __post_init__(self) -> None:
        if self.replace not in REPLACE_MODES:
            raise FoldGPTError(f"unknown --replace '{self.replace}'; choose one of {', '.join(REPLACE_MODES)}")
        if self.check_tokens < 0:
            raise FoldGPTError(f"--replace-check-tokens {self.check_tokens} is out of range; use 0 (no check) or more")
        if self.objective not in OBJECTIVES:
            raise FoldGPTError(f"unknown --replace-objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise FoldGPTError(f"--replace-nsamples {self.nsamples} / --replace-seqlen {self.seqlen} are out of range; "
                               "use at least 1 window of at least 2 tokens, e.g. 16 x 1024")
        if self.cosine_steps < 0 or not self.cosine_lr > 0:
            raise FoldGPTError("--replace-cosine-steps must be 0 or more and --replace-cosine-lr above 0")
        if not self.ridge >= 0:
            raise FoldGPTError(f"--replace-ridge {self.ridge} is out of range; use 0 or more, e.g. 1e-4")


@dataclass(frozen=True)
class TieConfig:
    """Ties (``foldgpt.surgery.ties``): which kept blocks run a neighbour's weights, and how their deltas are fitted.

    Defaults from docs/results/tie-init.md (SmolLM2-135M): a rank-64 delta started from the SVD and fitted by local
    reconstruction on the plan's own stream was the best tie of those measured; 32 x 256 windows, 150 Adam steps of 4.
    ``--fold auto`` compares its candidates after healing them (``probe_steps``): before healing the ties led removal by
    38% at -25% parameters and lost to it after the heal (docs/results/fold-vs-remove.md).
    """

    ties: str | None = setting(None, metavar="SPEC", help="PARENT:CHILD pairs of neighbouring kept blocks, in the "
                               "original model's indices, e.g. '11:12,16:15': the child runs the parent's linear "
                               "weights plus a low-rank delta and its own norms")
    rank: int = setting(64, flag="--tie-rank", metavar="R", help="rank of each tied child's delta (a LoRA adapter on "
                        "each of its projections, stored unmerged and trained further by healing)")
    data: str = setting("wikitext2", flag="--tie-data", metavar="DATA", help="the text the ties are fitted on "
                        "(a named data set's calibration split, or a .txt/.jsonl/.json file)")
    fit_windows: int = setting(32, flag="--tie-fit-windows", metavar="N", help="windows of {data} the deltas and norms "
                               "are fitted on")
    fit_seqlen: int = setting(256, flag="--tie-fit-seqlen", metavar="N", help="tokens per fitting window")
    fit_steps: int = setting(150, flag="--tie-fit-steps", metavar="N", help="Adam steps of each tie's local fit, 0 = the SVD start only")
    fit_batch: int = setting(4, flag="--tie-fit-batch", metavar="N", help="windows per fitting step")
    fit_lr: float = setting(1e-3, flag="--tie-fit-lr", metavar="X", help="Adam's learning rate of the local fit")
    seed: int = setting(0, flag="--tie-seed", help="seed of the fitting windows and their order")
    check_tokens: int = setting(8192, flag="--tie-check-tokens", metavar="N", help="with --fold auto: tokens of {data} "
                                "that no fitting window overlaps, on which removal only and the tie candidate are compared")
    check_seqlen: int = setting(1024, flag="--tie-check-seqlen", metavar="N", help="with --fold auto: tokens per window "
                                "of that comparison")
    margin: float = setting(0.05, flag="--tie-margin", metavar="F", help="with --fold auto: keep the tie candidate only "
                            "when its perplexity is at least this fraction below removal's (it runs one block more per "
                            "token); 0.05 is about the spread between two healing seeds (docs/results/fold-vs-remove.md)")
    probe_steps: int | None = setting(None, flag="--tie-probe-steps", metavar="N",
                                      none_means="the heal's whole budget (compress) or 25 steps (fold, prune)",
                                      help="with --fold auto: heal each candidate for N steps before the comparison, as "
                                      "the heal that follows will (compress: its data, window length, rate and seed; "
                                      "fold, prune: foldgpt heal's defaults), so that the kept one is the one that heals best; "
                                      "0 = compare them unhealed (ties lead before healing and can lose after it: "
                                      "docs/results/fold-vs-remove.md)")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise FoldGPTError(f"--tie-rank {self.rank} is out of range; use 1 or more, e.g. 64")
        if not 0 <= self.margin < 1:
            raise FoldGPTError(f"--tie-margin {self.margin} is out of range; use a fraction in [0, 1), e.g. 0.05")
        if self.probe_steps is not None and self.probe_steps < 0:
            raise FoldGPTError(f"--tie-probe-steps {self.probe_steps} is out of range; use 0 (compare unhealed) or more")
        if self.check_tokens < 1 or self.check_seqlen < 2:
            raise FoldGPTError("--tie-check-tokens must be 1 or more and --tie-check-seqlen 2 or more")
        if self.fit_windows < 1 or self.fit_seqlen < 2 or self.fit_batch < 1 or self.fit_steps < 0 or not self.fit_lr > 0:
            raise FoldGPTError("the tie fit needs --tie-fit-windows >= 1, --tie-fit-seqlen >= 2, --tie-fit-batch >= 1, "
                               "--tie-fit-steps >= 0 and --tie-fit-lr > 0")
