"""The ``analyze`` workflow: redundancy statistics on calibration windows, saved with figures."""

from __future__ import annotations

import time
from pathlib import Path

from foldgpt.analysis.blockwise import blockwise_redundancy_stats
from foldgpt.analysis.redundancy import RedundancyStats, redundancy_stats, write_analysis
from foldgpt.core.outputs import atomic_output_dir
from foldgpt.core.system import peak_rss_bytes
from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.formats.blockwise import BlockwiseModel
from foldgpt.formats.loading import LoadedModel


def analyze(
    loaded: LoadedModel,
    calibration: CalibrationConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> RedundancyStats:
    """The ``analyze`` workflow: statistics on calibration windows, saved with figures to ``out`` if given."""
    calibration = calibration or CalibrationConfig()
    start = time.perf_counter()
    windows = load_windows(loaded.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    stats = redundancy_stats(loaded.model, windows)
    stats.extra = {"model": loaded.source, "calibration": vars(calibration), "seconds": time.perf_counter() - start}
    if out is not None:
        with atomic_output_dir(Path(out), overwrite) as folder:
            write_analysis(stats, folder)
    return stats


def analyze_blockwise(spec: str, calibration=None, out: str | Path | None = None, overwrite: bool = False, dtype: str = "float32",
                      device: str = "cpu", offload_dir: str | Path | None = None) -> RedundancyStats:
    """:func:`foldgpt.analysis.analyze`, block by block: the same ``analysis.json`` and figures."""

    calibration = calibration or CalibrationConfig()
    start = time.perf_counter()
    runner = BlockwiseModel(spec, dtype=dtype, device=device)
    windows = load_windows(runner.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    stats = blockwise_redundancy_stats(runner, windows, offload_dir=offload_dir)
    stats.extra = {"model": runner.source, "calibration": vars(calibration), "seconds": time.perf_counter() - start,
                   **stats.extra, "offload_dir": None if offload_dir is None else str(offload_dir), "peak_rss_bytes": peak_rss_bytes()}
    if out is not None:
        with atomic_output_dir(Path(out), overwrite) as folder:
            write_analysis(stats, folder)
    return stats
