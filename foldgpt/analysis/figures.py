"""PNG figures: the similarity heatmap, the Block Influence bar chart and gate trajectories (headless, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_similarity_heatmap(similarity: Sequence[Sequence[float]], path: Path, title: str = "") -> None:
    """Cosine similarity of block outputs, block i against block j, as in the FoldGPT redundancy figures."""
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    image = axis.imshow(similarity, cmap="viridis", vmin=min(min(row) for row in similarity), vmax=1.0)
    figure.colorbar(image, ax=axis, label="mean cosine similarity of outputs")
    axis.set_xlabel("block j")
    axis.set_ylabel("block i")
    axis.set_title(f"Block output similarity {title}".strip())
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_block_influence(block_influence: Sequence[float], path: Path, title: str = "") -> None:
    """Block Influence per block (1 - cos(input, output)): low bars are the redundant blocks."""
    figure, axis = plt.subplots(figsize=(max(6.0, 0.25 * len(block_influence)), 3.5))
    axis.bar(range(len(block_influence)), block_influence, color="tab:blue")
    axis.set_xlabel("block")
    axis.set_ylabel("Block Influence")
    axis.set_title(f"Block Influence {title}".strip())
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _mark_runs(axis: Any, steps: int, run_steps: int | None) -> None:
    """Dotted vertical lines where one gate training run ends and the next starts from open gates."""
    if run_steps:
        for boundary in range(run_steps, steps, run_steps):
            axis.axvline(boundary + 0.5, color="grey", linestyle=":", linewidth=1.0)


def plot_sublayer_gate_history(
    history: Sequence[Sequence[float]], path: Path, title: str = "", run_steps: int | None = None
) -> None:
    """Sub-layer gates after every step (gate ``2 l``: block l's attention, ``2 l + 1``: its MLP): attention gates as
    solid blue lines, MLP gates as dashed orange lines, darker for later blocks. ``run_steps``: the steps of one run,
    when the history holds several (``--gate-restarts``), marked by dotted lines."""
    figure, axis = plt.subplots(figsize=(7.0, 4.5))
    steps = range(1, len(history) + 1)
    num_blocks = len(history[0]) // 2 if history else 0
    styles = (("attention", plt.get_cmap("Blues"), "-"), ("MLP", plt.get_cmap("Oranges"), "--"))
    for block in range(num_blocks):
        shade = 0.35 + 0.65 * block / max(1, num_blocks - 1)
        for offset, (name, colors, line) in enumerate(styles):
            axis.plot(steps, [gates[2 * block + offset] for gates in history], color=colors(shade), linestyle=line,
                      linewidth=1.0, label=name if block == num_blocks - 1 else None)
    _mark_runs(axis, len(history), run_steps)
    axis.set_xlabel("step")
    axis.set_ylabel("gate value")
    axis.set_title(f"Sub-layer gates during training {title}".strip())
    if num_blocks:
        axis.legend(title="darker: later block", fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_gate_history(
    history: Sequence[Sequence[float]], path: Path, title: str = "", run_steps: int | None = None
) -> None:
    """Each block's gate value after every training step: closing gates mark the blocks to remove. ``run_steps``: the
    steps of one run, when the history holds several (``--gate-restarts``), marked by dotted lines."""
    figure, axis = plt.subplots(figsize=(7.0, 4.5))
    steps = range(1, len(history) + 1)
    num_blocks = len(history[0]) if history else 0
    colors = plt.get_cmap("viridis")
    for block in range(num_blocks):
        axis.plot(steps, [gates[block] for gates in history], color=colors(block / max(1, num_blocks - 1)),
                  linewidth=1.0, label=str(block))
    _mark_runs(axis, len(history), run_steps)
    axis.set_xlabel("step")
    axis.set_ylabel("gate value")
    axis.set_title(f"Block gates during training {title}".strip())
    if 0 < num_blocks <= 40:
        axis.legend(title="block", fontsize="x-small", ncol=max(1, num_blocks // 12), loc="center left",
                    bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
