"""Training-free replacement of removed blocks by a linear map folded into the weights (ReplaceMe, Shopkhoev et al. 2025).

For each contiguous span of removed blocks, block ``i`` is the last kept block before it. Its output is
``Y + M``, where ``M`` is its MLP's residual update and ``Y`` the rest of the stream; the span turned that into
``L``, the hidden state after the span. Removal keeps ``Y + M``; replacement keeps ``Y + M T``, with ``T`` the
``d x d`` map that makes it closest to ``L`` on calibration windows (least squares with a ridge term). ``M T`` is
what block ``i``'s MLP output projection computes once ``T`` is folded into its weight (and bias), so the saved
model is a vanilla folder of the same architecture with not one parameter more.

The fold is exact only where ``M`` is the projection's own output: families that normalise the MLP's output before
adding it (Gemma 2/3's ``post_feedforward_layernorm``, post-LN OPT's ``final_layer_norm`` after the residual) are
refused, as is a span that starts at block 0 (no kept block before it to carry ``T``). docs/design.md has the algebra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from foldgpt.arch.adapters import ArchitectureAdapter, adapter_for
from foldgpt.errors import FoldGPTError

POST_NORMED = {"Gemma2": "post_feedforward_layernorm", "Gemma3": "post_feedforward_layernorm"}
"""Families whose MLP update passes through a norm after the output projection (a linear map does not commute with it)."""


@dataclass(frozen=True)
class Span:
    """Removed blocks ``first .. last`` (input numbering) and ``carrier``, the kept block before them whose MLP
    output projection takes the map."""

    first: int
    last: int

    @property
    def carrier(self) -> int:
        return self.first - 1

    def __str__(self) -> str:
        return f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"


def removed_spans(removed: Sequence[int]) -> list[Span]:
    """The maximal runs of consecutive blocks in ``removed``, in order."""
    spans: list[Span] = []
    for block in sorted(set(removed)):
        if spans and block == spans[-1].last + 1:
            spans[-1] = Span(spans[-1].first, block)
        else:
            spans.append(Span(block, block))
    return spans


def check_replaceable_family(config: PretrainedConfig, spans: Sequence[Span] = ()) -> None:
    """Refuse, in one line, a family whose MLP update is not its output projection's own output."""
    adapter = adapter_for(config)
    where = f" for blocks {spans[0]}" if spans else ""
    if adapter.family in POST_NORMED:
        raise FoldGPTError(f"--replace linear cannot fold a map{where}: {adapter.family} normalises the MLP's output "
                           f"({POST_NORMED[adapter.family]}) before adding it to the stream, so a map on that output is not "
                           "a change of the output projection; use --replace none")
    if adapter.family == "OPT" and not getattr(config, "do_layer_norm_before", True):
        raise FoldGPTError(f"--replace linear cannot fold a map{where}: this OPT normalises after the residual (post-LN), "
                           "so the stream is not Y + M; use --replace none")


def check_replaceable(config: PretrainedConfig, spans: Sequence[Span]) -> None:
    """Refuse, in one line naming the span and the reason, what the fold cannot do exactly."""
    if not spans:
        raise FoldGPTError("--replace linear needs at least one removed block")
    check_replaceable_family(config, spans)
    if spans[0].first == 0:
        raise FoldGPTError(f"--replace linear cannot replace blocks {spans[0]}: no kept block comes before them to carry the "
                           "map; remove another set or use --replace none")


class LinearFit:
    """The sufficient statistics of one span's least-squares fit ``min_T |M T - R|^2`` (``R = L - Y``), in float64.

    Only ``M^T M``, ``M^T R`` and ``|R|^2`` are kept, so they can be summed batch by batch, block by block.
    """

    def __init__(self, width: int) -> None:
        self.gram = torch.zeros(width, width, dtype=torch.float64)
        self.cross = torch.zeros(width, width, dtype=torch.float64)
        self.target_energy = 0.0
        self.tokens = 0

    def add(self, update: torch.Tensor, target: torch.Tensor) -> None:
        """One batch: ``update`` (the carrier's MLP output ``M``) and ``target`` (``R``), both ``... x d``."""
        m = update.reshape(-1, update.shape[-1]).to("cpu", torch.float64)
        r = target.reshape(-1, target.shape[-1]).to("cpu", torch.float64)
        self.gram += m.T @ m
        self.cross += m.T @ r
        self.target_energy += float((r * r).sum())
        self.tokens += len(m)

    def residual(self, transform: torch.Tensor) -> float:
        """``|M T - R|^2 / |R|^2`` from the statistics alone."""
        energy = (transform * (self.gram @ transform)).sum() - 2 * (transform * self.cross).sum() + self.target_energy
        return float(energy) / max(self.target_energy, 1e-300)

    def solve(self, ridge: float, span: Span) -> torch.Tensor:
        """``T = (M^T M + lambda I)^-1 M^T R`` with ``lambda = ridge * trace(M^T M) / d``; a one-line error when the
        statistics are not finite or the system is singular."""
        if not (torch.isfinite(self.gram).all() and torch.isfinite(self.cross).all()):
            raise FoldGPTError(f"--replace linear: the activations around blocks {span} are not finite (NaN or inf); "
                               "check the model in float32 or use --replace none")
        width = len(self.gram)
        scale = float(torch.trace(self.gram)) / width
        if scale <= 0:
            raise FoldGPTError(f"--replace linear: block {span.carrier}'s MLP output is zero on the calibration windows, so "
                               f"no map can be fitted for blocks {span}; use --replace none")
        system = self.gram + ridge * scale * torch.eye(width, dtype=torch.float64)
        transform, info = torch.linalg.solve_ex(system, self.cross)
        if int(info) != 0 or not torch.isfinite(transform).all():
            raise FoldGPTError(f"--replace linear: the fit for blocks {span} is singular; raise --replace-ridge (now {ridge}) "
                               "or the calibration windows, or use --replace none")
        return transform


def refined_by_cosine(transform: torch.Tensor, update: torch.Tensor, rest: torch.Tensor, target: torch.Tensor,
                      steps: int, lr: float) -> torch.Tensor:
    """``transform`` refined by full-batch Adam on the mean cosine distance between ``rest + update T`` and
    ``target`` (tokens x d each): the stream's direction is what the next block's norm sees."""
    weight = transform.to(torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = cosine_distance(rest + update @ weight, target)
            loss.backward()
            optimizer.step()
    refined = weight.detach().to(torch.float64)
    if not torch.isfinite(refined).all():
        raise FoldGPTError("--replace-objective cosine diverged (non-finite map); lower --replace-cosine-lr or use lstsq")
    return refined


def cosine_distance(stream: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``1 - cos(stream, target)``."""
    return (1 - torch.nn.functional.cosine_similarity(stream, target, dim=-1)).mean()


def fold_into_mlp_output(adapter: ArchitectureAdapter, block: nn.Module, transform: torch.Tensor) -> None:
    """Make ``block``'s MLP output projection compute ``M T`` instead of ``M``, in place (weight and bias)."""
    layer = adapter.mlp_output_layer(block)
    weight, bias = layer.weight, getattr(layer, "bias", None)
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        t = transform.to(weight.device, torch.float64)
        if isinstance(layer, nn.Linear):  # y = x W^T + b: W' = T^T W
            weight.copy_((t.T @ weight.to(torch.float64)).to(weight.dtype))
        else:  # GPT-2's Conv1D, y = x W + b: W' = W T
            weight.copy_((weight.to(torch.float64) @ t).to(weight.dtype))
        if isinstance(bias, torch.Tensor):
            bias.copy_((bias.to(torch.float64) @ t).to(bias.dtype))
