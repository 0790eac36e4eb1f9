"""How much to remove and how to share: the removal target and the grouping of the kept blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from foldgpt.core.settings import setting
from foldgpt.errors import FoldGPTError

TARGET_FIELDS = ("remove", "remove_ratio", "target_params", "target_flops")

Parent = Literal["first", "middle", "largest-gate"]
PARENTS = get_args(Parent)


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

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise FoldGPTError(f"--group-size {self.group_size} is out of range; use 1 (no sharing) or more")
