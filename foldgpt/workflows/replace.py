"""``--replace linear``: fit each removed span's map on the calibration windows, block by block, and fold it in.

Two hidden-state streams go through the blocks in order: the dense model's, and the pruned model's (every kept
block, each span already replaced by its fitted map). At a span's carrier (the kept block before it) the pruned
stream's MLP update ``M`` and the rest ``Y`` of the carrier's output are kept; at the span's end the dense stream
is the target ``L``, and ``M^T M`` and ``M^T (L - Y)`` are summed over the windows. So each span is fitted to the
inputs the pruned model really gives it, earlier spans' errors included, and only one block's weights are needed
at a time: the same code runs in memory (:class:`ResidentBlocks`) and from disk (:class:`BlockwiseModel`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from foldgpt.arch.adapters import adapter_for
from foldgpt.core.system import scratch_folder
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.blockwise import BlockwiseModel, HiddenStates, StagedBlocks, window_batches_of
from foldgpt.selection.blockwise import new_stream
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import blocks_removed_temporarily
from foldgpt.surgery.replacement import (
    LinearFit,
    Span,
    check_replaceable,
    cosine_distance,
    fold_into_mlp_output,
    refined_by_cosine,
    removed_spans,
)

REPLACE_BATCH = 4
"""Calibration windows per block call."""


class UpdateRecorder:
    """A forward hook on a block's MLP-update module that keeps its last output (the MLP's residual update ``M``)."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self.record)

    def record(self, module: nn.Module, inputs: tuple, output: object) -> None:
        self.output = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]

    def take(self) -> torch.Tensor:
        assert self.output is not None, "the block did not call its MLP"
        output, self.output = self.output, None
        return output


@torch.no_grad()
def replace_removed(runner: StagedBlocks, windows: torch.Tensor, removed: Sequence[int], config: ReplacementConfig,
                    offload_dir: str | Path | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fit and fold the map of every span of ``removed`` (input numbering) into ``runner``'s model.

    In memory the carriers' weights change in place; from disk (``BlockwiseModel``) the new tensors are returned by
    checkpoint key, for the folder writer. Also returns ``foldgpt.json``'s ``replacement`` record: per span the
    relative squared error and cosine distance of the stream after it, with the map and without it (plain removal)."""
    start = time.perf_counter()
    spans = removed_spans(removed)
    check_replaceable(runner.model.config, spans)
    with ExitStack() as stack:
        folder = scratch_folder(stack, offload_dir) if offload_dir is not None else None
        sweep = ReplacementSweep(runner, windows, spans, config, folder)
        for index in tqdm(range(runner.num_blocks), desc="replace", leave=False):
            sweep.visit(index)
    report: dict = {"method": config.replace, "objective": config.objective, "ridge": config.ridge,
                    "windows": len(windows), "seqlen": windows.shape[1], "tokens": windows.numel(), "spans": sweep.fits,
                    "seconds": time.perf_counter() - start}
    if config.objective == "cosine":
        report["cosine"] = {"steps": config.cosine_steps, "lr": config.cosine_lr}
    return report, sweep.replaced


class ReplacementSweep:
    """The two streams of :func:`replace_removed` and what the open span has kept, advanced one block at a time."""

    def __init__(self, runner: StagedBlocks, windows: torch.Tensor, spans: list[Span], config: ReplacementConfig,
                 folder: Path | None) -> None:
        self.runner, self.config, self.folder = runner, config, folder
        self.carriers = {span.carrier: span for span in spans}
        self.ends = {span.last: span for span in spans}
        self.gone = {block for span in spans for block in range(span.first, span.last + 1)}
        self.batches = window_batches_of(windows, REPLACE_BATCH)
        self.dense = new_stream(folder, "dense")
        for batch in self.batches:
            self.dense.append(runner.embed(batch))
        self.pruned: HiddenStates | None = None  # None while it equals the dense stream (before the first span)
        self.parts: tuple[HiddenStates, HiddenStates] | None = None  # the open span's carrier's M and Y, per batch
        self.targets = HiddenStates()  # the dense stream after the open span, per batch
        self.fit: LinearFit | None = None
        self.fits: list[dict] = []
        self.replaced: dict[str, torch.Tensor] = {}

    def visit(self, index: int) -> None:
        """Run block ``index`` on both streams (the pruned one only when it is kept); close a span that ends here."""
        block = self.runner.load_block(index)
        recorder = None
        if index in self.carriers:
            recorder = UpdateRecorder(self.runner.adapter.branch_update(block, "mlp"))
            self.parts = new_stream(self.folder, f"update_{index}"), new_stream(self.folder, f"rest_{index}")
            self.targets = new_stream(self.folder, f"target_{index}")
            self.fit = LinearFit(self.dense[0].shape[-1])
        try:
            for number, batch in enumerate(self.batches):
                self.visit_batch(index, number, batch, recorder)
        finally:
            if recorder:
                recorder.handle.remove()
            self.runner.free_block(index)
        if index in self.ends:
            self.close_span(self.ends[index])

    def visit_batch(self, index: int, number: int, batch: torch.Tensor, recorder: UpdateRecorder | None) -> None:
        dense_out = self.runner.run_block(index, self.dense[number], batch.shape)
        if recorder and self.pruned is None:
            keep_parts(self.parts, recorder.take(), dense_out)
        self.dense[number] = dense_out
        if self.pruned is not None and index not in self.gone:
            pruned_out = self.runner.run_block(index, self.pruned[number], batch.shape)
            if recorder:
                keep_parts(self.parts, recorder.take(), pruned_out)
            self.pruned[number] = pruned_out
        if index in self.ends:
            assert self.fit is not None and self.parts is not None
            update, rest = self.parts[0][number], self.parts[1][number]
            target = dense_out.to(update.device, update.dtype)
            self.fit.add(update, target - rest)
            self.targets.append(target)

    def close_span(self, span: Span) -> None:
        """Solve the span's map, record it, move the pruned stream past the span and fold the map into the carrier."""
        assert self.fit is not None and self.parts is not None
        transform = fitted_map(self.fit, self.parts, self.targets, self.config, span)
        self.fits.append(span_record(span, self.fit, transform, self.parts, self.targets))
        self.pruned = pruned_after_span(self.pruned, self.parts, transform, self.folder, span)
        fold_map(self.runner, span.carrier, transform, self.replaced)
        self.parts = self.fit = None


def keep_parts(parts: tuple[HiddenStates, HiddenStates] | None, update: torch.Tensor, output: torch.Tensor) -> None:
    """Append the carrier's MLP update ``M`` and the rest of its output ``Y = output - M`` (OPT's ``fc2`` sees the
    tokens flattened: ``M`` is reshaped as the output)."""
    assert parts is not None
    update = update.reshape(output.shape)
    parts[0].append(update)
    parts[1].append(output - update)


def pruned_after_span(pruned: HiddenStates | None, parts: tuple[HiddenStates, HiddenStates], transform: torch.Tensor,
                      folder: Path | None, span: Span) -> HiddenStates:
    """The pruned stream after ``span``: ``Y + M T`` for every batch (a new stream the first time)."""
    stream = pruned if pruned is not None else new_stream(folder, f"pruned_{span.last}")
    for number in range(len(parts[0])):
        update, rest = parts[0][number], parts[1][number]
        value = rest + (update.to(torch.float64) @ transform).to(update.dtype)
        if pruned is None:
            stream.append(value)
        else:
            stream[number] = value
    return stream


def fitted_map(fit: LinearFit, parts: tuple[HiddenStates, HiddenStates], targets: HiddenStates,
               config: ReplacementConfig, span: Span) -> torch.Tensor:
    """The span's map: the ridge least-squares solution, refined on the cosine distance with ``objective`` cosine."""
    transform = fit.solve(config.ridge, span)
    if config.objective != "cosine":
        return transform
    update, rest, target = (torch.cat([stream[n] for n in range(len(stream))]).flatten(0, -2).float()
                            for stream in (*parts, targets))
    return refined_by_cosine(transform, update, rest, target, config.cosine_steps, config.cosine_lr)


def span_record(span: Span, fit: LinearFit, transform: torch.Tensor, parts: tuple[HiddenStates, HiddenStates],
                targets: HiddenStates) -> dict:
    """One span's entry in the report (input numbering): the relative squared error of the stream after the span and
    its mean cosine distance from the dense one, with the map and without it."""
    identity = torch.eye(len(transform), dtype=torch.float64)
    with_map = without = 0.0
    for number in range(len(targets)):
        update, rest, target = parts[0][number].double(), parts[1][number].double(), targets[number].double()
        tokens = target.numel() / target.shape[-1]
        with_map += float(cosine_distance(rest + update @ transform, target)) * tokens
        without += float(cosine_distance(rest + update, target)) * tokens
    return {"removed": list(range(span.first, span.last + 1)), "carrier": span.carrier, "tokens": fit.tokens,
            "fit_error": fit.residual(transform), "error_without": fit.residual(identity),
            "cosine_distance": with_map / fit.tokens, "cosine_distance_without": without / fit.tokens}


def fold_map(runner: StagedBlocks, carrier: int, transform: torch.Tensor, replaced: dict[str, torch.Tensor]) -> None:
    """Fold ``transform`` into block ``carrier``'s MLP output projection; from disk, keep the new tensors by key."""
    block = runner.load_block(carrier)
    fold_into_mlp_output(runner.adapter, block, transform)
    if isinstance(runner, BlockwiseModel):
        layer = runner.adapter.mlp_output_layer(block)
        for name, parameter in layer.named_parameters():
            key = runner.checkpoint_key(carrier, f"{runner.adapter.mlp_output_name}.{name}")
            replaced[key] = parameter.detach().to("cpu").clone()
        runner.free_block(carrier)


def with_saved_carriers(report: dict, removed: Sequence[int], num_blocks: int) -> dict:
    """``report`` with each span's carrier also in the saved folder's numbering (``carrier_saved``)."""
    kept = [index for index in range(num_blocks) if index not in set(removed)]
    spans = [{**span, "carrier_saved": kept.index(span["carrier"])} for span in report["spans"]]
    return {**report, "spans": spans}


def carrier_weights(model: nn.Module, removed: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
    """A copy of every carrier's MLP output projection (weight, bias), by carrier: plain removal's weights."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    return {span.carrier: {name: tensor.detach().clone() for name, tensor in
                           adapter.mlp_output_layer(layers[span.carrier]).state_dict().items()}
            for span in removed_spans(removed)}


@torch.no_grad()
def held_out_check(model: PreTrainedModel, removed: Sequence[int], original: dict[int, dict[str, torch.Tensor]],
                   windows: torch.Tensor) -> dict:
    """Perplexity of ``model`` without ``removed`` on held-out ``windows``, with its fitted maps and with the
    ``original`` carrier weights; the maps stay only if they are lower (else a warning, and plain removal)."""
    if len(windows) == 0:
        print("foldgpt: warning: no calibration text is left beside the fitting windows to check the maps on; kept "
              "them unchecked (give more text or --replace-check-tokens 0)", file=sys.stderr)
        return {"tokens": 0, "kept": True}
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    fitted = carrier_weights(model, removed)

    def perplexity_with(weights: dict[int, dict[str, torch.Tensor]]) -> float:
        for carrier, state in weights.items():
            adapter.mlp_output_layer(layers[carrier]).load_state_dict(state)
        with blocks_removed_temporarily(model, removed) as pruned:
            return windows_perplexity(pruned, windows, progress=False)

    plain, replaced = perplexity_with(original), perplexity_with(fitted)
    kept = replaced <= plain
    if not kept:
        perplexity_with(original)
        print(f"foldgpt: warning: the linear maps made held-out perplexity worse ({replaced:.2f} against {plain:.2f} "
              "without them), so the blocks are removed plainly; a long removed span is the usual cause "
              "(docs/results/replacement.md)", file=sys.stderr)
    return {"tokens": windows.numel(), "perplexity_with_maps": replaced, "perplexity_without": plain, "kept": kept}
