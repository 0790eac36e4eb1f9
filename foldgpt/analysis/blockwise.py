"""Redundancy statistics computed block by block, for models larger than memory."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

from foldgpt.analysis.redundancy import RedundancyStats
from foldgpt.core.system import scratch_folder
from foldgpt.formats.blockwise import BlockwiseModel, read_exact


class _UnitOutputs:
    """Unit-normalised block outputs, one file per block, for the exact token-averaged similarity matrix."""

    def __init__(self, folder: Path, num_blocks: int, hidden_size: int) -> None:
        self.paths = [folder / f"unit_outputs_{i}.bin" for i in range(num_blocks)]
        self.hidden_size = hidden_size
        self.tokens = 0
        for path in self.paths:
            path.write_bytes(b"")

    def append(self, index: int, units: torch.Tensor) -> None:
        data = units.to("cpu", torch.float32).contiguous().reshape(-1, self.hidden_size)
        with open(self.paths[index], "ab") as handle:
            handle.write(data.view(torch.uint8).numpy().data.cast("B"))
        if index == 0:
            self.tokens += len(data)

    def gram(self, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """``sum_t u_i(t) . u_j(t)`` for every pair of blocks, reading ``chunk_bytes`` of states at a time."""
        blocks = len(self.paths)
        chunk = max(1, chunk_bytes // (4 * self.hidden_size * blocks))
        total = torch.zeros(blocks, blocks, dtype=torch.float64)
        for start in range(0, self.tokens, chunk):
            rows = min(chunk, self.tokens - start)
            units = torch.empty(blocks, rows, self.hidden_size)
            for i, path in enumerate(self.paths):
                read_exact(path, 4 * self.hidden_size * start, units[i])
            flat = units.flatten(1)
            total += (flat @ flat.T).double()
        return total


@torch.no_grad()
def blockwise_redundancy_stats(
    runner: BlockwiseModel, windows: torch.Tensor, batch_size: int = 1, offload_dir: str | Path | None = None,
    similarity: bool = True,
) -> RedundancyStats:
    """What :func:`foldgpt.analysis.redundancy_stats` computes, block by block (see the module docstring).

    The similarity matrix needs every block's per-token unit outputs: they go to files (``L x tokens x d`` float32)
    in ``offload_dir`` or a temporary folder, and are read back in chunks; the hidden states go to ``offload_dir``
    too when it is given. ``similarity=False`` skips the matrix (left empty) and its files: bi and angular need only
    the Block Influence and the last-token states.
    """
    num_blocks, hidden_size = runner.num_blocks, runner.hidden_size
    cos_in_out = torch.zeros(num_blocks, dtype=torch.float64)
    residual = torch.zeros(num_blocks + 1, len(windows), hidden_size)  # last-token inputs, and the last output
    with ExitStack() as stack:
        folder = scratch_folder(stack, offload_dir)
        units = _UnitOutputs(folder, num_blocks, hidden_size) if similarity else None

        def visit(index: int, number: int, rows: slice, x: torch.Tensor, y: torch.Tensor) -> None:
            x, y = x.float(), y.float()
            cos_in_out[index] += F.cosine_similarity(x, y, dim=-1).sum().double().cpu()
            residual[index, rows] = x[:, -1].cpu()
            if index == num_blocks - 1:
                residual[num_blocks, rows] = y[:, -1].cpu()
            if units is not None:
                units.append(index, F.normalize(y, dim=-1))

        runner.sweep(windows, batch_size, visit, folder if offload_dir is not None else None, desc="analysis (blocks)")
        gram = units.gram() if units is not None else None
    tokens = windows.numel()
    unit_residual = F.normalize(residual, dim=-1).transpose(0, 1)  # [n, L+1, H]
    cosines = (unit_residual @ unit_residual.transpose(1, 2)).clamp(-1.0, 1.0)
    angular = (torch.arccos(cosines) / math.pi).double().sum(dim=0)
    return RedundancyStats(
        block_influence=(1.0 - cos_in_out / tokens).tolist(),
        similarity=(gram / tokens).tolist() if gram is not None else [],
        angular_distance=(angular / len(windows)).tolist(),
        tokens=tokens,
        windows=len(windows),
        extra={"offload": "blocks", "max_loaded_blocks": runner.max_loaded_blocks},
    )
