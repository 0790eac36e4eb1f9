"""FoldGPT gated block removal: learn one scalar gate per block, then remove the blocks whose gates close.

Each block's residual update is scaled by a gate, ``out = h_in + g_l * (block(h_in) - h_in)`` (``g_l = 1`` is the
unmodified model, ``g_l = 0`` removes the block). Only the gates train; every model weight stays frozen. The loss is

    distill(teacher || gated model) + lam * R(g),   R(g) = sum_l w_l * (t * |g_l| - |g_l - mean(g)|)

where the teacher is the same model with its gates bypassed, ``w_l`` is block ``l``'s share of the FLOPs, and ``R`` is
the polarization regulariser of Zhuang et al. (NeurIPS 2020): ``t * |g|`` pulls every gate towards 0, while
``-|g - mean(g)|`` pushes gates away from their mean, so they split into a closed group and an open group instead of
all shrinking together. Unlike Block Influence, which scores each block alone, the gates are trained jointly and
so see how blocks compensate for one another. Gates only rank the blocks: the retained blocks ship unchanged.

Sub-layer granularity (ours, docs/design.md section 2): two gates per block, one on the attention's and one on the MLP's
residual update (``h += g_a * attention``, ``h += g_m * mlp``; the module whose output is that update is named by the
adapter: ``attention_update`` / ``mlp_update``). Gate ``2 l`` is block ``l``'s attention, ``2 l + 1`` its MLP. They
train exactly as block gates do, each weighted in ``R`` by its own share of the FLOPs, and budget control counts the
cost of the closed sub-layers (one each for ``--remove N``, parameters or FLOPs for the budget targets). The
sub-layers with the smallest gates are removed until the target is met (``selection_from_sublayer_gates``); a
block whose two sub-layers both go is removed as a block.

Data-parallel (``torchrun`` / ``accelerate launch`` with ``W`` processes, see docs/distributed.md): a step sees
``micro_batch * grad_accum * W`` windows; rank ``r`` takes micro-batches ``r * grad_accum .. (r + 1) * grad_accum - 1``
of the step's ``grad_accum * W`` (in the order one process would draw them), the gate gradient is averaged over the
ranks with one all-reduce, so ``W`` processes train the gates of one process with ``grad_accum * W`` micro-batches
(up to float rounding). Every rank then holds the same gates, so budget control takes the same decisions everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from foldgpt.arch.adapters import LINEAR_TYPES, adapter_for
from foldgpt.errors import FoldGPTError
from foldgpt.selection.base import Selection, SelectionMethod
from foldgpt.selection.config import GRANULARITIES, GateConfig
from foldgpt.surgery.sublayers import BRANCHES, check_sublayer_removal_supported
from foldgpt.train.lora import adapters_off, compensating_lora
from foldgpt.train.losses import distillation_loss, next_token_loss
from foldgpt.train.modes import activation_checkpointing, eval_mode, frozen_weights
from foldgpt.train.parallel import DataParallel


@dataclass
class GateTrainingResult:
    """Final gates, their trajectory (one list of gate values per step) and the loss terms per step."""

    gates: list[float]
    gate_history: list[list[float]]
    loss_history: list[float]
    distill_history: list[float]
    regularizer_history: list[float]
    lambda_history: list[float]
    flops_weights: list[float]
    config: GateConfig
    granularity: str = "block"
    world_size: int = 1  # data-parallel processes: a step saw micro_batch * grad_accum * world_size windows
    restarts: int = 1  # runs trained one after another: the histories hold config.steps entries per run
    on_target_history: list[bool] = field(default_factory=list)  # per step: exactly the target's gates closed


class BlockGates:
    """One trainable scalar per decoder block (or per sub-layer); ``active = False`` makes the hooks pass outputs through."""

    def __init__(self, num_blocks: int, device: torch.device) -> None:
        self.values = nn.Parameter(torch.ones(num_blocks, device=device))
        self.active = True
        self.hard_mask: torch.Tensor | None = None  # set: the forward uses it, the gradient flows to ``values``

    def value(self, index: int) -> torch.Tensor:
        """Gate ``index`` as the forward uses it: its value, or under a hard mask the mask's 0 or 1 with the
        straight-through gradient of the value (``mask + g - g.detach()``)."""
        gate = self.values[index]
        if self.hard_mask is None:
            return gate
        return self.hard_mask[index] + gate - gate.detach()

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Run the unmodified model (the distillation teacher) without removing the hooks."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def tolist(self) -> list[float]:
        return self.values.detach().float().cpu().tolist()


def _gate_hook(gates: BlockGates, index: int):
    """A forward hook that replaces a block's output by ``h_in + g * (output - h_in)``, keeping a tuple a tuple."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not gates.active:
            return None
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output if isinstance(output, torch.Tensor) else output[0]
        gate = gates.value(index).to(hidden_out)  # same dtype as the stream: bf16 stays bf16
        hidden_in = hidden_in.to(hidden_out.device)  # a device map moves a block's input inside its forward only
        gated_out = hidden_in + gate * (hidden_out - hidden_in)
        return gated_out if isinstance(output, torch.Tensor) else (gated_out, *output[1:])

    return hook


def _update_gate_hook(gates: BlockGates, index: int):
    """A forward hook that scales a branch's residual update (a tensor, or the first item of a tuple) by its gate."""

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        if not gates.active:
            return None
        if isinstance(output, torch.Tensor):
            return gates.value(index).to(output) * output
        assert isinstance(output, tuple)
        return (gates.value(index).to(output[0]) * output[0], *output[1:])

    return hook


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise FoldGPTError(f"unknown gate granularity '{granularity}'; choose one of {', '.join(GRANULARITIES)}")


@contextmanager
def gated(model: PreTrainedModel, granularity: str = "block") -> Iterator[BlockGates]:
    """Gate every decoder block (or, with ``granularity="sublayer"``, every attention and MLP update: gate ``2 l`` and
    ``2 l + 1``) while the context is open; on exit the hooks go and the model is as before."""
    _check_granularity(granularity)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    device = next(model.parameters()).device
    if granularity == "block":
        gates = BlockGates(len(layers), device)
        handles = [layer.register_forward_hook(_gate_hook(gates, i), with_kwargs=True) for i, layer in enumerate(layers)]
    else:
        check_sublayer_removal_supported(model)
        gates = BlockGates(2 * len(layers), device)
        modules = [adapter.branch_update(layer, branch) for layer in layers for branch in BRANCHES]
        if len({id(module) for module in modules}) != len(modules):
            raise FoldGPTError(f"{adapter.family}: the attention and MLP updates are not separate modules; sub-layer gates need them")
        handles = [module.register_forward_hook(_update_gate_hook(gates, i)) for i, module in enumerate(modules)]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def block_flops_weights(model: PreTrainedModel) -> torch.Tensor:
    """Each block's share of the per-token matmul FLOPs of all blocks (sums to 1, float32, on the CPU).

    A linear layer costs 2 FLOPs per weight per token, so the share is the share of linear-layer weights. The
    attention-score term (proportional to sequence length) and norms, biases and activations are left out: they are
    small, and for the usual uniform stack equal in every block.
    """
    layers = adapter_for(model).layers(model)
    counts = torch.tensor(
        [sum(m.weight.numel() for m in layer.modules() if isinstance(m, LINEAR_TYPES)) for layer in layers],
        dtype=torch.float64,
    )
    if counts.sum() == 0:
        raise FoldGPTError("cannot weigh blocks by FLOPs: the decoder blocks contain no linear layers")
    return (counts / counts.sum()).float()


def sublayer_flops_weights(model: PreTrainedModel) -> torch.Tensor:
    """Each sub-layer's share of the per-token matmul FLOPs of all blocks, in gate order (attention 0, MLP 0, ...).

    As ``block_flops_weights``, the share of linear-layer weights: those of the attention's modules, and of the MLP's
    (``adapter.branch_parts``).
    """
    adapter = adapter_for(model)
    counts = torch.tensor(
        [
            sum(m.weight.numel() for name in adapter.branch_parts(branch) for m in layer.get_submodule(name).modules()
                if isinstance(m, LINEAR_TYPES))
            for layer in adapter.layers(model)
            for branch in BRANCHES
        ],
        dtype=torch.float64,
    )
    if counts.sum() == 0:
        raise FoldGPTError("cannot weigh sub-layers by FLOPs: the decoder blocks contain no linear layers")
    return (counts / counts.sum()).float()


def polarization_regularizer(
    gates: torch.Tensor, weights: torch.Tensor, t: float, center: torch.Tensor | float | None = None
) -> torch.Tensor:
    """``sum_l w_l * (t * |g_l| - |g_l - c|)`` with ``c = mean(g)`` (Zhuang et al., 2020): low when gates sit at 0 or
    far from it. A fixed ``center`` (a number, no gradient) replaces the mean: see ``target_center``."""
    weights = weights.to(gates)
    c = gates.mean() if center is None else center
    return (weights * (t * gates.abs() - (gates - c).abs())).sum()


def target_center(gates: torch.Tensor, n_remove: float, costs: torch.Tensor | None = None) -> float:
    """The split point that puts exactly the target below it: midway between the largest gate that the removal target
    needs (the gates taken in ascending order until their costs reach ``n_remove``) and the next gate up.

    With ``polarization_center="target"`` this replaces the mean in the regulariser, so only the gates the target
    would remove now are pushed down (with ``t = 1`` the rest feel no pull at all), instead of every gate below the
    mean; which gates those are is re-decided every step, so a gate whose closing the loss resists climbs back above
    the split and the next one takes its place.
    """
    values = gates.detach().double().cpu()
    order = torch.argsort(values, stable=True)
    unit = torch.ones_like(values) if costs is None else costs.double().cpu()
    needed = int(torch.searchsorted(torch.cumsum(unit[order], 0), torch.tensor(n_remove - 1e-9, dtype=torch.float64)))
    needed = min(needed, len(values) - 2)
    return float(values[order[needed]] + values[order[needed + 1]]) / 2


def window_batches(windows: torch.Tensor, micro_batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless micro-batches of calibration windows: a fresh seeded permutation each pass over the data."""
    generator = torch.Generator().manual_seed(seed)

    def indices() -> Iterator[int]:
        while True:
            yield from torch.randperm(len(windows), generator=generator).tolist()

    order = indices()
    while True:
        yield windows[[next(order) for _ in range(micro_batch)]]


def _check_finite(loss: torch.Tensor, what: str, step: int, steps: int) -> None:
    if not torch.isfinite(loss):
        raise FoldGPTError(
            f"gate training diverged at step {step}/{steps}: the {what} is {loss.item()} "
            "(check the model's weights for NaN/inf, or lower the learning rate)"
        )


def _micro_batch_loss(
    model: PreTrainedModel, gates: BlockGates, ids: torch.Tensor, config: GateConfig, lora: Any = None
) -> torch.Tensor:
    """The distillation (or LM) loss of one micro-batch; the teacher (gates bypassed, ``lora``'s adapters off) runs in
    the same step, without gradients."""
    if config.loss == "lm":
        return next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
    with torch.no_grad(), gates.bypassed(), adapters_off(lora):
        teacher_logits = model(input_ids=ids, use_cache=False).logits
    student_logits = model(input_ids=ids, use_cache=False).logits
    return distillation_loss(student_logits, teacher_logits, config.temperature)


def hard_removal_mask(gates: torch.Tensor, n_remove: float, costs: torch.Tensor | None = None) -> torch.Tensor:
    """1 for the gates that stay, 0 for the smallest gates, taken in ascending order (ties: the earlier gate) until
    their costs (one per gate; unit costs without) reach ``n_remove``: the set the removal would take now."""
    order = sorted(range(len(gates)), key=lambda i: (float(gates[i]), i))
    unit = [1.0] * len(gates) if costs is None else costs.tolist()
    mask = torch.ones_like(gates)
    total = 0.0
    for index in order:
        if total >= n_remove - 1e-9:
            break
        mask[index] = 0.0
        total += unit[index]
    return mask


def budget_direction(
    gates: torch.Tensor, n_remove: float | None, config: GateConfig, costs: torch.Tensor | None = None
) -> int:
    """Budget control's verdict: +1 while too few gates are closed, -1 while too many are, 0 on target (or off).

    With ``costs`` (one per gate), ``n_remove`` is the cost to remove: too few means the closed gates cost less than
    it, too many that one closed gate (the cheapest) could reopen and the rest would still cost enough. With unit
    costs that is the plain count.
    """
    if n_remove is None or config.lam_growth == 0:
        return 0
    return closed_count_direction(gates, n_remove, config.closed_below, costs)


def closed_count_direction(gates: torch.Tensor, n_remove: float, closed_below: float, costs: torch.Tensor | None = None) -> int:
    """+1 while the gates below ``closed_below`` cost less than ``n_remove``, -1 while one of them (the cheapest)
    could reopen and the rest would still cost enough, 0 when exactly the target is closed (``budget_direction``'s
    count, whether budget control is on or not)."""
    closed = gates < closed_below
    costs = torch.ones_like(gates, dtype=torch.float64) if costs is None else costs.to(device=gates.device, dtype=torch.float64)
    removed = float(costs[closed].sum())
    if removed < n_remove - 1e-9:
        return 1
    if bool(closed.any()) and removed - float(costs[closed].min()) >= n_remove - 1e-9:
        return -1
    return 0


def next_lambda(
    lam: float, gates: torch.Tensor, n_remove: float | None, config: GateConfig, costs: torch.Tensor | None = None,
    growth: float | None = None,
) -> float:
    """Budget control: multiply ``lam`` by ``1 + growth`` while too few gates are closed, divide by it while too
    many are (``growth`` defaults to ``config.lam_growth``; ``train_gates`` damps it, see ``GateConfig``)."""
    growth = config.lam_growth if growth is None else growth
    return lam * (1 + growth) ** budget_direction(gates, n_remove, config, costs)


def train_gates(
    model: PreTrainedModel,
    windows: torch.Tensor,
    config: GateConfig,
    seed: int,
    n_remove: float | None = None,
    granularity: str = "block",
    costs: list[float] | None = None,
) -> GateTrainingResult:
    """Train one gate per block (or per sub-layer) on calibration ``windows`` ([n, seqlen] token ids); the model is
    unchanged after.

    ``n_remove`` is the removal target that budget control (``config.lam_growth > 0``) steers towards: a number of
    gates, or with ``costs`` (one per gate) the cost of the gates to close. With ``config.restarts > 1`` the runs
    follow one another (seeds ``seed``, ``seed + 1``, ...), their histories are concatenated, and ``gates`` is
    ``ensemble_gates`` of the runs.

    Under a launcher with several processes (``WORLD_SIZE > 1``) each rank trains on its share of every step's
    micro-batches on its own device (the model is moved there and back) and the gate gradients are averaged over
    the ranks; every rank returns the same result. Without one, accelerate is not imported.
    """
    runs = [_train_gate_run(model, windows, config, seed + run, n_remove, granularity, costs,
                            label="gates" if config.restarts == 1 else f"gates {run + 1}/{config.restarts}")
            for run in range(config.restarts)]
    return runs[0] if len(runs) == 1 else _combine_runs(runs)


def ensemble_gates(
    histories: Sequence[Sequence[Sequence[float]]],
    on_target: Sequence[Sequence[bool]] | None = None,
    readout: str = "final",
) -> list[float]:
    """The gates that ``restarts`` remove by: every run's ``run_readout`` (by default its gates averaged over its last
    quarter of steps, which smooths the budget controller's swings), then averaged over the runs (which keeps the
    blocks they agree on)."""
    flags = on_target if on_target is not None else [[False] * len(history) for history in histories]
    per_run = [torch.tensor(run_readout(history, run_flags, readout, single=False), dtype=torch.float64)
               for history, run_flags in zip(histories, flags, strict=True)]
    return torch.stack(per_run).mean(dim=0).tolist()


def run_readout(history: Sequence[Sequence[float]], on_target: Sequence[bool], readout: str, single: bool) -> list[float]:
    """One run's gates to remove by (``GateConfig.readout``): ``final``, the last step's (``single``) or the last
    quarter's average (a restart); ``on-target``, the average over the second half's steps with exactly the target
    closed, or the last quarter's average if there were none."""
    if readout == "on-target":
        steps = [step for step in range(len(history) // 2, len(history)) if on_target[step]]
        if steps:
            return torch.tensor([history[step] for step in steps], dtype=torch.float64).mean(dim=0).tolist()
    elif single:
        return list(history[-1])
    return torch.tensor(history[-max(1, len(history) // 4):], dtype=torch.float64).mean(dim=0).tolist()


def _combine_runs(runs: list[GateTrainingResult]) -> GateTrainingResult:
    """One result from several runs: histories one after another, gates by ``ensemble_gates``."""
    return GateTrainingResult(
        gates=ensemble_gates([run.gate_history for run in runs], [run.on_target_history for run in runs], runs[0].config.readout),
        gate_history=[gates for run in runs for gates in run.gate_history],
        loss_history=[value for run in runs for value in run.loss_history],
        distill_history=[value for run in runs for value in run.distill_history],
        regularizer_history=[value for run in runs for value in run.regularizer_history],
        lambda_history=[value for run in runs for value in run.lambda_history],
        flops_weights=runs[0].flops_weights,
        config=runs[0].config,
        granularity=runs[0].granularity,
        world_size=runs[0].world_size,
        restarts=len(runs),
        on_target_history=[flag for run in runs for flag in run.on_target_history],
    )


def _train_gate_run(
    model: PreTrainedModel,
    windows: torch.Tensor,
    config: GateConfig,
    seed: int,
    n_remove: float | None,
    granularity: str,
    costs: list[float] | None,
    label: str,
) -> GateTrainingResult:
    """One gate training run of ``config.steps`` steps (``train_gates`` without restarts)."""
    setup = _setup_gate_run(model, windows, granularity, costs)
    batches = window_batches(windows, config.micro_batch, seed)
    history = _GateHistory()
    budget = _BudgetController(lam=config.lam, growth=config.lam_growth)
    with _gate_training(model, setup, config, granularity, seed) as trainer:
        run = _GateRun(model, config, n_remove, setup, trainer, batches)
        progress = tqdm(range(1, config.steps + 1), desc=label, leave=False, disable=setup.rank != 0)
        for step in progress:
            distill, regularizer = run.step(step, budget.lam)
            history.record(trainer.gates.tolist(), distill, regularizer, budget.lam, run.on_target())
            budget.update(run.budget_direction(), config.lam_damping)
            progress.set_postfix(loss=f"{history.totals[-1]:.4f}")
    return _run_result(history, setup, config, granularity)


@dataclass(frozen=True)
class _GateRunSetup:
    """Where a run trains and what it weighs, checked before any hook or optimiser exists."""

    parallel: DataParallel | None
    home: torch.device  # where the model is before and after the run
    device: torch.device  # where it trains: ``home``, or under a launcher this process's device
    weights: torch.Tensor  # each gate's share of the FLOPs, the regulariser's ``w_l``
    costs: torch.Tensor | None  # budget control's cost per gate (None: one each)

    @property
    def rank(self) -> int:
        return self.parallel.rank if self.parallel else 0

    @property
    def world(self) -> int:
        return self.parallel.world if self.parallel else 1


def _setup_gate_run(model: PreTrainedModel, windows: torch.Tensor, granularity: str, costs: list[float] | None) -> _GateRunSetup:
    """Refuse what a run cannot train on (windows, a device map under a launcher, costs that miss gates) and say
    where it runs."""
    _check_granularity(granularity)
    if windows.dim() != 2 or len(windows) == 0:
        raise FoldGPTError(f"gate training needs calibration windows of shape [n, seqlen], got {tuple(windows.shape)}")
    parallel = DataParallel.from_environment()
    home = next(model.parameters()).device
    if parallel is not None and len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        raise FoldGPTError(
            "--device-map spreads one model over the devices of one process; a data-parallel launch (accelerate launch, "
            "torchrun) gives each process its own device instead: use one or the other"
        )
    device = parallel.device if parallel else home
    weights = (block_flops_weights(model) if granularity == "block" else sublayer_flops_weights(model)).to(device)
    if costs is not None and len(costs) != len(weights):
        raise FoldGPTError(f"budget control needs one cost per gate: {len(costs)} costs for {len(weights)} gates")
    cost_tensor = None if costs is None else torch.tensor(costs, dtype=torch.float64)
    return _GateRunSetup(parallel=parallel, home=home, device=device, weights=weights, costs=cost_tensor)


@dataclass
class _GateTrainer:
    """The trainable side of a run: the gates, the compensating LoRA (or None) with its adapters, the optimiser."""

    gates: BlockGates
    lora: Any
    adapters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer


@contextmanager
def _gate_training(
    model: PreTrainedModel, setup: _GateRunSetup, config: GateConfig, granularity: str, seed: int
) -> Iterator[_GateTrainer]:
    """The model frozen, in eval mode and gated (and moved to this process's device) while the context is open;
    on exit it is as before."""
    with ExitStack() as stack:
        if setup.device != setup.home:  # data-parallel: this process's replica on its own device, back where it was after
            module: nn.Module = model  # nn.Module.to: PreTrainedModel.to's annotations confuse mypy
            module.to(setup.device)
            stack.callback(module.to, setup.home)
        stack.enter_context(frozen_weights(model))
        stack.enter_context(eval_mode(model))
        stack.enter_context(activation_checkpointing(model, config.gradient_checkpointing))
        gates = stack.enter_context(gated(model, granularity))
        lora = stack.enter_context(compensating_lora(model, config.lora_rank, seed))
        adapters = [] if lora is None else [p for p in model.parameters() if p.requires_grad]
        optimizer = (torch.optim.Adam([gates.values], lr=config.lr) if config.optimizer == "adam"
                     else torch.optim.SGD([gates.values], lr=config.lr, momentum=0.9))
        if adapters:
            optimizer.add_param_group({"params": adapters, "lr": config.lora_lr})
        yield _GateTrainer(gates=gates, lora=lora, adapters=adapters, optimizer=optimizer)


@dataclass
class _GateRun:
    """A run in progress (inside ``_gate_training``): what one optimiser step needs."""

    model: PreTrainedModel
    config: GateConfig
    n_remove: float | None
    setup: _GateRunSetup
    trainer: _GateTrainer
    batches: Iterator[torch.Tensor]

    def step(self, step: int, lam: float) -> tuple[float, float]:
        """Optimiser step ``step`` (1-based) with regulariser weight ``lam``; returns (distillation loss, regulariser).
        The last ``hard_steps`` steps run the model with the hard removal mask of the moment."""
        gates, config = self.trainer.gates, self.config
        self.trainer.optimizer.zero_grad(set_to_none=True)
        hard = step > config.steps - config.hard_steps
        gates.hard_mask = (hard_removal_mask(gates.values.detach(), self.n_remove, self.setup.costs)
                           if hard and self.n_remove is not None else None)
        distill = self._distillation(step)
        regularizer = self._regularizer(step, lam)
        self.trainer.optimizer.step()
        with torch.no_grad():
            gates.values.clamp_(0.0, config.max_gate)
        return distill, regularizer

    def _distillation(self, step: int) -> float:
        """The step's distillation (or LM) loss over this process's micro-batches, its gradient accumulated;
        data-parallel: the loss and the gradients averaged over the ranks."""
        config, setup, parallel = self.config, self.setup, self.setup.parallel
        distill = 0.0
        for micro in range(config.grad_accum * setup.world):
            batch = next(self.batches)  # every rank draws the whole step's micro-batches, in one process's order
            if micro // config.grad_accum != setup.rank:
                continue  # another rank's share
            loss = _micro_batch_loss(self.model, self.trainer.gates, batch.to(setup.device), config, self.trainer.lora)
            if parallel is None:
                _check_finite(loss, f"{config.loss} loss", step, config.steps)
            (loss / config.grad_accum).backward()
            distill += loss.item() / config.grad_accum
        if parallel is not None:  # the same loss on every rank (a NaN on one stops all), then the mean gradient
            distill = parallel.mean({"distill": distill})["distill"]
            _check_finite(torch.tensor(distill), f"{config.loss} loss", step, config.steps)
            for parameter in (self.trainer.gates.values, *self.trainer.adapters):
                assert parameter.grad is not None
                parallel.mean_(parameter.grad)
        return distill

    def _regularizer(self, step: int, lam: float) -> float:
        """The polarization regulariser of the gates (centred on the target's split with ``polarization_center="target"``),
        its gradient times ``lam`` accumulated."""
        values, config = self.trainer.gates.values, self.config
        center = (target_center(values, self.n_remove, self.setup.costs)
                  if config.polarization_center == "target" and self.n_remove is not None else None)
        regularizer = polarization_regularizer(values, self.setup.weights, config.t, center)
        _check_finite(regularizer, "polarization regularizer", step, config.steps)
        (lam * regularizer).backward()
        return regularizer.item()

    def budget_direction(self) -> int:
        """Budget control's verdict on the gates after the step; none while the hard mask decides."""
        gates = self.trainer.gates
        if gates.hard_mask is not None:
            return 0
        return budget_direction(gates.values.detach(), self.n_remove, self.config, self.setup.costs)

    def on_target(self) -> bool:
        """Whether exactly the target's gates are closed after the step (never without a target or under the hard mask)."""
        gates = self.trainer.gates
        if self.n_remove is None or gates.hard_mask is not None:
            return False
        return closed_count_direction(gates.values.detach(), self.n_remove, self.config.closed_below, self.setup.costs) == 0


@dataclass
class _BudgetController:
    """``next_lambda``'s rule across steps: ``lam`` times ``(1 + growth) ** direction``, the growth damped by
    ``lam_damping`` at each reversal (the controller overshot, so it steps more gently)."""

    lam: float
    growth: float
    last_direction: int = 0

    def update(self, direction: int, damping: float) -> None:
        if direction and self.last_direction and direction != self.last_direction:
            self.growth *= damping
        self.last_direction = direction or self.last_direction
        self.lam *= (1 + self.growth) ** direction


@dataclass
class _GateHistory:
    """What each step of a run recorded: the gates after it, its loss terms, the ``lam`` it ran with."""

    gates: list[list[float]] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    distills: list[float] = field(default_factory=list)
    regularizers: list[float] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)
    on_target: list[bool] = field(default_factory=list)

    def record(self, gates: list[float], distill: float, regularizer: float, lam: float, on_target: bool) -> None:
        self.gates.append(gates)
        self.on_target.append(on_target)
        self.distills.append(distill)
        self.regularizers.append(regularizer)
        self.totals.append(distill + lam * regularizer)
        self.lambdas.append(lam)


def _run_result(history: _GateHistory, setup: _GateRunSetup, config: GateConfig, granularity: str) -> GateTrainingResult:
    """The run's result; data-parallel: refuses ranks that ended apart (they take the same decisions by design)."""
    parallel = setup.parallel
    if parallel is not None and len({repr(ranked) for ranked in parallel.gather_object((history.gates[-1], history.lambdas))}) > 1:
        raise FoldGPTError("data-parallel gate training: the ranks ended with different gates (a bug; please report it)")
    return GateTrainingResult(
        gates=run_readout(history.gates, history.on_target, config.readout, single=True),
        gate_history=history.gates,
        loss_history=history.totals,
        distill_history=history.distills,
        regularizer_history=history.regularizers,
        lambda_history=history.lambdas,
        flops_weights=setup.weights.cpu().tolist(),
        config=config,
        granularity=granularity,
        world_size=setup.world,
        on_target_history=history.on_target,
    )


def selection_from_gates(result: GateTrainingResult, n_remove: int) -> Selection:
    """Remove the ``n_remove`` blocks with the smallest gates, ``result.gates`` (the final gates, or with restarts
    ``ensemble_gates``; ties: the earlier block)."""
    ranking = sorted(range(len(result.gates)), key=lambda i: (result.gates[i], i))
    return Selection(
        method="gates",
        removed=sorted(ranking[:n_remove]),
        scores=result.gates,
        details=_details(result),
    )


def _details(result: GateTrainingResult) -> dict:
    return {
        "granularity": result.granularity,
        "final_gates": result.gates,  # the gates removed by: with restarts, ensemble_gates of the runs
        "gate_history": result.gate_history,
        "loss_history": result.loss_history,
        "distill_loss_history": result.distill_history,
        "regularizer_history": result.regularizer_history,
        "lambda_history": result.lambda_history,
        "flops_weights": result.flops_weights,
        "hyperparameters": asdict(result.config),
        "world_size": result.world_size,
        "restarts": result.restarts,
        "on_target_history": result.on_target_history,
    }


def selection_from_sublayer_gates(result: GateTrainingResult, costs: list[float], needed: float) -> Selection:
    """Remove sub-layers by ascending gate (ties: the earlier gate) until their costs reach ``needed``.

    ``removed`` lists the blocks whose attention and MLP both go (removed as blocks); ``removed_sublayers`` the
    branches removed from blocks that stay, ``{"attention": [blocks], "mlp": [blocks]}``.
    """
    order = sorted(range(len(result.gates)), key=lambda i: (result.gates[i], i))
    chosen: list[int] = []
    total = 0.0
    for index in order:
        if total >= needed - 1e-9:
            break
        chosen.append(index)
        total += costs[index]
    if len(chosen) >= len(order) or total < needed - 1e-9:
        raise FoldGPTError("the removal target would remove every sub-layer; give a smaller target")
    closed = set(chosen)
    num_blocks = len(result.gates) // 2
    blocks = [b for b in range(num_blocks) if 2 * b in closed and 2 * b + 1 in closed]
    if len(blocks) >= num_blocks:
        raise FoldGPTError("the removal target would remove every block; give a smaller target")
    partial = {branch: [b for b in range(num_blocks) if 2 * b + k in closed and b not in blocks]
               for k, branch in enumerate(BRANCHES)}
    details = _details(result)
    details.update(
        gate_order=[f"{b}.{branch}" for b in range(num_blocks) for branch in BRANCHES],
        closed_sublayers={branch: [b for b in range(num_blocks) if 2 * b + k in closed] for k, branch in enumerate(BRANCHES)},
        sublayer_costs=costs,
        removed_cost=total,
        needed_cost=needed,
    )
    return Selection(method="gates", removed=blocks, scores=result.gates, details=details, removed_sublayers=partial)


def select_sublayers_by_gates_with(config: GateConfig, costs: list[float], needed: float) -> SelectionMethod:
    """A sub-layer selection method: ``costs`` per gate (attention 0, MLP 0, ...) and the cost to remove, ``needed``
    (``foldgpt.budget.sublayer_budget``). The ``n_remove`` argument of the method is ignored."""

    def select(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
        result = train_gates(model, windows, config, seed, needed, granularity="sublayer", costs=costs)
        return selection_from_sublayer_gates(result, costs, needed)

    return select


def select_by_gates_with(config: GateConfig) -> SelectionMethod:
    """A selection method with the given hyper-parameters (for the CLI's gate options)."""

    def select(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
        return selection_from_gates(train_gates(model, windows, config, seed, n_remove), n_remove)

    return select


def select_by_gates(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
    """FoldGPT's learnable gates with the default ``GateConfig``; ``details`` holds the gate trajectory."""
    return select_by_gates_with(GateConfig())(model, windows, n_remove, seed)

