"""Redundancy analysis: how much each block changes its input, and how alike the blocks' outputs are.

Hidden states are taken with forward hooks on the decoder blocks themselves (not ``output_hidden_states``, whose last
entry comes after the final norm). Three statistics, all averaged over calibration tokens:

* Block Influence (ShortGPT): ``BI_i = 1 - mean_t cos(h_in_i, h_out_i)``.
* Pairwise similarity of block outputs: ``S[i][j] = mean_t cos(h_out_i, h_out_j)``.
* Angular distance between residual states (Gromov et al.), on the last token of each window:
  ``D[a][b] = mean arccos(cos(x_a, x_b)) / pi`` with ``x_a`` the input of block ``a`` (``x_L`` the last output),
  so removing blocks ``l .. l+n-1`` costs ``D[l][l+n]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from foldgpt.analysis.figures import plot_block_influence, plot_similarity_heatmap
from foldgpt.arch.adapters import adapter_for, hidden_of


@dataclass
class BlockStates:
    """The inputs and outputs of every decoder block during one forward pass."""

    inputs: list[torch.Tensor | None]
    outputs: list[torch.Tensor | None]


def _captured(value: torch.Tensor | None) -> torch.Tensor:
    """A state the hooks recorded (every block runs in a forward pass, so none is missing)."""
    assert value is not None, "a decoder block did not run during the forward pass"
    return value



@contextmanager
def capture_block_states(layers: nn.ModuleList) -> Iterator[BlockStates]:
    """Record each block's input and output hidden states (detached) while the context is open."""
    states = BlockStates(inputs=[None] * len(layers), outputs=[None] * len(layers))

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            states.inputs[index] = hidden_of(hidden_in).detach()
            states.outputs[index] = hidden_of(output).detach()

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class RedundancyStats:
    """Token-averaged redundancy statistics of one model on one calibration set."""

    block_influence: list[float]
    similarity: list[list[float]]
    angular_distance: list[list[float]]
    tokens: int
    windows: int
    extra: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.block_influence)

    def best_angular_span(self, n: int) -> int:
        """First block of the ``n`` consecutive blocks whose removal has the smallest angular distance."""
        distances = [self.angular_distance[start][start + n] for start in range(self.num_blocks - n + 1)]
        return min(range(len(distances)), key=distances.__getitem__)

    def to_dict(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "tokens": self.tokens,
            "windows": self.windows,
            "block_influence": self.block_influence,
            "similarity": self.similarity,
            "angular_distance": self.angular_distance,
            "best_angular_span": {n: self.best_angular_span(n) for n in range(1, self.num_blocks)},
            **self.extra,
        }


@torch.no_grad()
def redundancy_stats(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1) -> RedundancyStats:
    """Block Influence, output similarity and angular distances of ``model`` over calibration ``windows``."""
    layers = adapter_for(model).layers(model)
    num_blocks = len(layers)
    device = next(model.parameters()).device
    cos_in_out = torch.zeros(num_blocks, dtype=torch.float64)
    similarity = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
    angular = torch.zeros(num_blocks + 1, num_blocks + 1, dtype=torch.float64)
    tokens = 0
    with capture_block_states(layers) as states:
        for start in tqdm(range(0, len(windows), batch_size), desc="analysis", leave=False):
            batch = windows[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            inputs = torch.stack([_captured(t).float() for t in states.inputs])  # [L, B, T, H]
            outputs = torch.stack([_captured(t).float() for t in states.outputs])
            cos_in_out += F.cosine_similarity(inputs, outputs, dim=-1).sum(dim=(1, 2)).double().cpu()
            unit_outputs = F.normalize(outputs, dim=-1).flatten(1)  # [L, B*T*H]; dot = sum of per-token cosines
            similarity += (unit_outputs @ unit_outputs.T).double().cpu()
            residual = torch.cat([inputs[:, :, -1], outputs[-1:, :, -1]])  # [L+1, B, H], last token
            unit_residual = F.normalize(residual, dim=-1).transpose(0, 1)  # [B, L+1, H]
            cosines = (unit_residual @ unit_residual.transpose(1, 2)).clamp(-1.0, 1.0)
            angular += (torch.arccos(cosines) / math.pi).sum(dim=0).double().cpu()
            tokens += batch.numel()
    return RedundancyStats(
        block_influence=(1.0 - cos_in_out / tokens).tolist(),
        similarity=(similarity / tokens).tolist(),
        angular_distance=(angular / len(windows)).tolist(),
        tokens=tokens,
        windows=len(windows),
    )




def write_analysis(stats: RedundancyStats, out_dir: Path) -> None:
    """``analysis.json`` plus the heatmap and Block Influence bar chart, into ``out_dir``."""

    (out_dir / "analysis.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    title = Path(str(stats.extra.get("model", ""))).name
    plot_similarity_heatmap(stats.similarity, out_dir / "similarity_heatmap.png", title=title)
    plot_block_influence(stats.block_influence, out_dir / "block_influence.png", title=title)
