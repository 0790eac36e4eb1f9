"""Which calibration text to use and how to cut it into windows (shared by analysis and every selection method)."""

from __future__ import annotations

from dataclasses import dataclass

from foldgpt.core.settings import setting
from foldgpt.errors import FoldGPTError


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration text and how it is windowed (shared by analysis and every pruning method)."""

    data: str = setting("wikitext2", flag="calibration", metavar="DATA",
                        help="wikitext2 (validation split), ptb (validation), alpaca, a .txt/.jsonl/.json file, or a cached "
                        "datasets name; named sets are read from $FOLDGPT_DATA or ../shared/data")
    nsamples: int = setting(16, help="number of calibration windows")
    seqlen: int = setting(256, help="tokens per calibration window")
    seed: int = setting(0, help="seed for window offsets and random choices")

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen"):
            if getattr(self, name) < 1:
                raise FoldGPTError(f"calibration needs {name} >= 1, got {getattr(self, name)}")
