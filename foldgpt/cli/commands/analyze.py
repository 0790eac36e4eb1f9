"""``foldgpt analyze``: Block Influence, similarity heatmap and angular distance of one model."""

from __future__ import annotations

import argparse
from pathlib import Path

from foldgpt.analysis.redundancy import RedundancyStats
from foldgpt.cli.commands.common import load
from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import AnalyzeSettings
from foldgpt.core.outputs import check_output_free
from foldgpt.core.system import peak_rss_bytes
from foldgpt.workflows.analyze import analyze, analyze_blockwise


def run(args: argparse.Namespace) -> None:
    settings: AnalyzeSettings = read_config(args, AnalyzeSettings())
    check_output_free(Path(args.out), args.overwrite)
    stats = measure(settings, args.out, args.overwrite)
    ranking = sorted(range(stats.num_blocks), key=lambda i: stats.block_influence[i])
    print(f"analysed {stats.num_blocks} blocks on {stats.tokens} tokens in {stats.extra['seconds']:.1f}s")
    print("lowest Block Influence: " + ", ".join(f"{i} ({stats.block_influence[i]:.4f})" for i in ranking[:8]))
    print(f"wrote {args.out}/analysis.json, similarity_heatmap.png, block_influence.png")
    blockwise = " (block by block)" if settings.offload.offload == "blocks" else ""
    print(f"peak resident memory {peak_rss_bytes() / 2**20:.0f} MiB{blockwise}")


def measure(settings: AnalyzeSettings, out: str, overwrite: bool) -> RedundancyStats:
    if settings.offload.offload == "blocks":
        model = settings.loading
        return analyze_blockwise(model.model, settings.calibration, out=out, overwrite=overwrite, dtype=model.dtype,
                                 device=model.device, offload_dir=settings.offload.offload_dir)
    return analyze(load(settings.loading), settings.calibration, out=out, overwrite=overwrite)
