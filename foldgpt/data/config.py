"""Which calibration text to use and how to cut it into windows (shared by analysis and every selection method)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CalibrationConfig:
    """The calibration text and how it is windowed (shared by analysis and every pruning method)."""

    data: str = "wikitext2"
    nsamples: int = 16
    seqlen: int = 256
    seed: int = 0
