"""How close can a tied block start? Tie initialisations against deleting the block, before any healing (issue 22).

For each pair ``a:b`` of adjacent blocks, block ``b`` (the child) is changed in the dense model, one variant at a
time, and WikiText-2 validation perplexity is measured on windows that skip the fitting windows:

- ``delete``: ``b`` removed; ``delete+linear``: removed, with ``--replace linear``'s map folded into ``a`` (0 extra
  parameters; what ``prune --replace linear`` ships);
- ``tie``: ``b`` runs ``a``'s linear weights with its own norms (today's fold); ``tie-average``: ``a`` and ``b`` both run
  the average of their weights (the shared block of Relaxed Recursive Transformers);
- ``tie+svd``: ``a``'s weights plus the rank-``r`` truncated SVD of ``W_b - W_a`` per projection (the delta a LoRA
  adapter of rank ``r`` would start from); ``own-svd``: ``b``'s own rank-``r`` approximation (no sharing, reference);
- local reconstruction: ``b``'s own parameters on top of ``a``'s shared weights fitted to the dense block ``b``'s
  outputs on calibration inputs (Adam, relative squared error of the block's update): ``fit-norms`` (its norms),
  ``fit-scales`` (norms and per-channel input and output scales of every projection), ``fit-lora`` (norms and a rank-``r``
  delta from zero), ``fit-svd-lora`` (norms and the rank-``r`` delta from the SVD).

Every variant is scored by the block's local error on held-out inputs (1.0 = deleting it) and the model's perplexity;
``extra`` is the parameters the tie keeps for ``b`` beyond the shared weights (norms not counted).

    OMP_NUM_THREADS=1 python research/tie_init.py --pairs 12:13,13:14,24:25,4:5 --out research/results/tie_init.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from foldgpt.arch.adapters import LINEAR_TYPES, adapter_for
from foldgpt.data.text import load_text
from foldgpt.data.windows import calibration_starts, calibration_windows, tokenize, windows_avoiding
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import blocks_removed_temporarily
from foldgpt.workflows.replace import replace_removed


def linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)}


def truncated(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B, A`` with ``B @ A`` the rank-``rank`` truncated SVD of ``matrix`` (the singular values split evenly)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


@contextmanager
def weights_set(block: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """``block``'s linear weights replaced by ``weights`` (by module name) inside the context, restored after."""
    modules = linears(block)
    saved = {name: modules[name].weight.data.clone() for name in weights}
    try:
        for name, weight in weights.items():
            modules[name].weight.data.copy_(weight)
        yield
    finally:
        for name, weight in saved.items():
            modules[name].weight.data.copy_(weight)


@contextmanager
def norms_saved(norms: list[nn.Module]) -> Iterator[None]:
    """The norms' parameters restored on exit (the fits train them in place)."""
    saved = [{name: p.data.clone() for name, p in norm.named_parameters()} for norm in norms]
    try:
        yield
    finally:
        for norm, values in zip(norms, saved):
            for name, p in norm.named_parameters():
                p.data.copy_(values[name])


class TiedChild(nn.Module):
    """The child's own parameters over the shared weights: ``W = diag(s_out) (W_shared + B A) diag(s_in)``."""

    def __init__(self, shared: dict[str, torch.Tensor], rank: int, scales: bool, init: dict[str, tuple] | None, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = list(shared)
        self.shared = {name: weight.clone() for name, weight in shared.items()}
        self.s_in = nn.ParameterDict()
        self.s_out = nn.ParameterDict()
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for index, (name, weight) in enumerate(shared.items()):
            key = str(index)
            out_features, in_features = weight.shape
            if scales:
                self.s_in[key] = nn.Parameter(torch.ones(in_features))
                self.s_out[key] = nn.Parameter(torch.ones(out_features))
            if rank:
                if init is not None:
                    b, a = init[name]
                else:  # LoRA's start: A small and random, B zero
                    a, b = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5, torch.zeros(out_features, rank)
                self.a[key], self.b[key] = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def weight(self, index: int) -> torch.Tensor:
        key, weight = str(index), self.shared[self.names[index]]
        if key in self.a:
            weight = weight + self.b[key] @ self.a[key]
        if key in self.s_in:
            weight = self.s_out[key][:, None] * weight * self.s_in[key][None, :]
        return weight

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: self.weight(index) for index, name in enumerate(self.names)}

    def extra(self) -> int:
        return sum(p.numel() for p in self.parameters())


@contextmanager
def child_weights(block: nn.Module, child: TiedChild) -> Iterator[None]:
    """``block``'s linear layers compute with ``child``'s weights (differentiably) inside the context."""
    modules = linears(block)
    handles = []
    for index, name in enumerate(child.names):
        module = modules[name]

        def forward(mod: nn.Module, args: tuple, output: torch.Tensor, index: int = index) -> torch.Tensor:
            return nn.functional.linear(args[0], child.weight(index), mod.bias)

        handles.append(module.register_forward_hook(forward))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def relative_error(runner: ResidentBlocks, index: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Squared error of block ``index``'s output against ``outputs``, over the squared size of the dense update."""
    error = norm = 0.0
    with torch.no_grad():
        for x, y in zip(inputs, outputs):
            error += float((runner.call_block(index, x, x.shape[:2]) - y).double().pow(2).sum())
            norm += float((y - x).double().pow(2).sum())
    return error / norm


def fit_child(runner: ResidentBlocks, index: int, child: TiedChild, norms: list[nn.Module], data: tuple, args) -> list[float]:
    """Adam on the child's own parameters and norms: the relative squared error of the block's output on ``data``."""
    inputs, outputs = data
    block = runner.blocks[index]
    parameters = list(child.parameters()) + [p for norm in norms for p in norm.parameters()]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=args.fit_lr)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with child_weights(block, child):
        for _ in range(args.fit_steps):
            order = torch.randperm(len(inputs), generator=generator)[: args.fit_batch]
            optimizer.zero_grad(set_to_none=True)
            loss = sum(((runner.call_block(index, inputs[i], inputs[i].shape[:2]) - outputs[i]).pow(2).sum()
                        / (outputs[i] - inputs[i]).pow(2).sum()) for i in order) / len(order)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    for p in parameters:
        p.requires_grad_(False)
    return losses


def dense_streams(runner: ResidentBlocks, windows: torch.Tensor, block: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Block ``block``'s input and output in the model as it is now, one tensor per window."""
    inputs, outputs = [], []
    for window in windows:
        hidden = runner.embed(window[None])
        for index in range(block):
            hidden = runner.run_block(index, hidden, (1, window.numel()))
        inputs.append(hidden)
        outputs.append(runner.run_block(block, hidden, (1, window.numel())))
    return inputs, outputs


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the tie's rank, the fitting and the held-out windows (shared with ``tie_plan.py``)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--fit-windows", type=int, default=32)
    parser.add_argument("--fit-seqlen", type=int, default=256)
    parser.add_argument("--fit-steps", type=int, default=150)
    parser.add_argument("--fit-batch", type=int, default=4)
    parser.add_argument("--fit-lr", type=float, default=1e-3)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)


@dataclass
class FitSetup:
    """The frozen model, its WikiText-2 validation tokens, the fitting windows and the spans they cover, and the
    held-out windows that skip them."""

    loaded: LoadedModel
    tokens: torch.Tensor
    fit: torch.Tensor
    fit_spans: list[tuple[int, int]]
    held_out: torch.Tensor


def fit_setup(args: argparse.Namespace) -> FitSetup:
    torch.manual_seed(0)
    loaded = load_model(args.model)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    tokens = tokenize(loaded.tokenizer, load_text("wikitext2", "calibration"))
    fit = calibration_windows(tokens, args.fit_windows, args.fit_seqlen, seed=0)
    spans = [(s, s + args.fit_seqlen) for s in calibration_starts(len(tokens), args.fit_windows, args.fit_seqlen, 0)]
    held_out = windows_avoiding(tokens, args.eval_seqlen, args.eval_tokens, spans)
    return FitSetup(loaded=loaded, tokens=tokens, fit=fit, fit_spans=spans, held_out=held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(parser)
    parser.add_argument("--pairs", default="12:13,13:14,24:25,4:5")
    parser.add_argument("--variants", default="delete,delete+linear,tie,tie-average,tie+svd,own-svd,fit-norms,fit-scales,fit-lora,fit-svd-lora")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    setup = fit_setup(args)
    fit, held_out = setup.fit, setup.held_out
    model, adapter = setup.loaded.model, adapter_for(setup.loaded.model)
    local_windows = windows_avoiding(setup.tokens, args.fit_seqlen, 8 * args.fit_seqlen, setup.fit_spans)  # held-out inputs for the local error
    runner = ResidentBlocks(model)
    dense = windows_perplexity(model, held_out, progress=False)
    print(f"dense {dense:.2f} on {held_out.numel()} held-out tokens", flush=True)
    variants = args.variants.split(",")
    rows = []
    out = Path(args.out)
    for pair in args.pairs.split(","):
        a, b = (int(x) for x in pair.split(":"))
        start = time.perf_counter()
        fit_data, local_data = dense_streams(runner, fit, b), dense_streams(runner, local_windows, b)
        block_a, block_b = runner.blocks[a], runner.blocks[b]
        own = {name: module.weight.data.clone() for name, module in linears(block_b).items()}
        parent = {name: module.weight.data.clone() for name, module in linears(block_a).items()}
        norms = adapter.block_norms(block_b)
        results = {}
        for variant in variants:
            began = time.perf_counter()
            record: dict = {"extra": 0}
            with norms_saved(norms), weights_set(block_b, own), weights_set(block_a, parent):
                if variant == "delete":
                    record["local_error"] = 1.0
                    with blocks_removed_temporarily(model, [b]) as pruned:
                        record["ppl"] = windows_perplexity(pruned, held_out, progress=False)
                elif variant == "delete+linear":
                    report, _ = replace_removed(runner, fit, [b], ReplacementConfig("linear"))
                    record["fit"] = report["spans"]
                    with blocks_removed_temporarily(model, [b]) as pruned:
                        record["ppl"] = windows_perplexity(pruned, held_out, progress=False)
                else:
                    if variant == "tie-average":
                        average = {name: (parent[name] + own[name]) / 2 for name in own}
                        weights_a, weights_b = average, average
                    elif variant in ("tie+svd", "own-svd"):
                        base = parent if variant == "tie+svd" else {name: torch.zeros_like(w) for name, w in own.items()}
                        weights_a = parent
                        weights_b = {}
                        for name in own:
                            up, down = truncated(own[name] - base[name], args.rank)
                            weights_b[name] = base[name] + up @ down
                        record["extra"] = sum(args.rank * sum(w.shape) for w in own.values())
                    elif variant.startswith("fit-"):
                        rank = args.rank if "lora" in variant else 0
                        init = {name: truncated(own[name] - parent[name], rank) for name in own} if variant == "fit-svd-lora" else None
                        child = TiedChild(parent, rank, variant == "fit-scales", init, seed=0)
                        with weights_set(block_b, parent):
                            losses = fit_child(runner, b, child, norms, fit_data, args)
                        record["fit_loss"] = [losses[0], losses[-1]]
                        record["extra"] = child.extra()
                        with torch.no_grad():
                            weights_b = child.weights()
                        weights_a = parent
                    else:  # tie
                        weights_a, weights_b = parent, parent
                    with weights_set(block_a, weights_a), weights_set(block_b, weights_b):
                        if variant == "tie-average":
                            record["local_error"] = None  # the parent changes too: only the model's perplexity says
                        else:
                            record["local_error"] = relative_error(runner, b, *local_data)
                        record["ppl"] = windows_perplexity(model, held_out, progress=False)
            record["seconds"] = time.perf_counter() - began
            results[variant] = record
            local = "-" if record.get("local_error") is None else f"{record['local_error']:.3f}"
            print(f"{a}->{b} {variant}: ppl {record['ppl']:.2f}, local error {local}, extra {record['extra']}", flush=True)
        rows.append({"parent": a, "child": b, "results": results, "seconds": time.perf_counter() - start})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "settings": vars(args), "dense": dense,
                                   "held_out_tokens": held_out.numel(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
