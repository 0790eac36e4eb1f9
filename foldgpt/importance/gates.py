"""FoldGPT gated block removal: learn one scalar gate per block, then remove the blocks whose gates close.

Each block's residual update is scaled by a gate, ``out = h_in + g_l * (block(h_in) - h_in)`` (``g_l = 1`` is the
unmodified model, ``g_l = 0`` removes the block). Only the gates train; every model weight stays frozen. The loss is

    distill(teacher || gated model) + lam * R(g),   R(g) = sum_l w_l * (t * |g_l| - |g_l - mean(g)|)

where the teacher is the same model with its gates bypassed, ``w_l`` is block ``l``'s share of the FLOPs, and ``R`` is
the polarization regulariser of Zhuang et al. (NeurIPS 2020): ``t * |g|`` pulls every gate towards 0, while
``-|g - mean(g)|`` pushes gates away from their mean, so they split into a closed group and an open group instead of
all shrinking together. Unlike Block Influence, which scores each block alone, the gates are trained jointly and
so see how blocks compensate for one another. Gates only rank the blocks: the retained blocks ship unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from foldgpt.errors import FoldGPTError
from foldgpt.importance.base import Selection, SelectionMethod, register
from foldgpt.models import adapter_for
from foldgpt.models.adapters import LINEAR_TYPES

LOSSES = ("kl", "lm")


@dataclass(frozen=True)
class GateConfig:
    """Hyper-parameters of gate training.

    Defaults were chosen on SmolLM2-135M with ``benchmarks/tune_gates.py`` (removing 6 blocks, perplexity on WikiText-2
    and PTB *validation* text): budget control on (``lam_growth=0.1``) and 80 steps beat a fixed ``lam=0.5`` (60
    steps) and the variants ``lam_growth=0.05`` with 120 steps and ``t=2``; results in
    ``benchmarks/results/tune_gates.json``.

    ``lam`` weighs the polarization regulariser against the distillation loss and ``t`` its pull towards 0; with
    ``t = 1`` an open gate above the mean feels almost no pull, while a gate below the mean is pushed down with
    weight ``t + 1``. Each step sees ``micro_batch * grad_accum`` calibration windows. ``loss`` is ``"kl"``
    (KL(teacher || gated model) on next-token distributions at ``temperature``) or ``"lm"`` (next-token
    cross-entropy on the calibration text). After each step the gates are clamped to ``[0, max_gate]``.

    Budget control (the paper's FLOPs constraint): with ``lam_growth > 0`` and a removal target, ``lam`` is multiplied
    by ``1 + lam_growth`` after every step in which fewer gates than the target are closed (below ``closed_below``)
    and divided by it when more are, so the regulariser's strength finds the level at which the target number of
    blocks switches off jointly, whatever the loss scale of the model.
    """

    steps: int = 80
    lr: float = 0.05
    lam: float = 0.5
    t: float = 1.0
    micro_batch: int = 1
    grad_accum: int = 1
    loss: str = "kl"
    gradient_checkpointing: bool = False
    temperature: float = 1.0
    max_gate: float = 1.0
    lam_growth: float = 0.1
    closed_below: float = 0.5

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise FoldGPTError(f"unknown gate loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        for name in ("steps", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise FoldGPTError(f"gate training needs {name} >= 1, got {getattr(self, name)}")
        if self.lam_growth < 0:
            raise FoldGPTError(f"gate training needs lam_growth >= 0, got {self.lam_growth}")
        for name in ("temperature", "max_gate"):
            if not getattr(self, name) > 0:
                raise FoldGPTError(f"gate training needs {name} > 0, got {getattr(self, name)}")


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


class BlockGates:
    """One trainable scalar per decoder block; ``active = False`` makes the hooks pass block outputs through."""

    def __init__(self, num_blocks: int, device: torch.device) -> None:
        self.values = nn.Parameter(torch.ones(num_blocks, device=device))
        self.active = True

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

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if not gates.active:
            return None
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output if isinstance(output, torch.Tensor) else output[0]
        gate = gates.values[index].to(hidden_out)  # same dtype as the stream: bf16 stays bf16
        hidden_in = hidden_in.to(hidden_out.device)  # a device map moves a block's input inside its forward only
        gated_out = hidden_in + gate * (hidden_out - hidden_in)
        return gated_out if isinstance(output, torch.Tensor) else (gated_out, *output[1:])

    return hook


@contextmanager
def gated(model: PreTrainedModel) -> Iterator[BlockGates]:
    """Gate every decoder block while the context is open; on exit the hooks go and the model is as before."""
    layers = adapter_for(model).layers(model)
    gates = BlockGates(len(layers), next(model.parameters()).device)
    handles = [layer.register_forward_hook(_gate_hook(gates, i), with_kwargs=True) for i, layer in enumerate(layers)]
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


def polarization_regularizer(gates: torch.Tensor, weights: torch.Tensor, t: float) -> torch.Tensor:
    """``sum_l w_l * (t * |g_l| - |g_l - mean(g)|)`` (Zhuang et al., 2020): low when gates sit at 0 or far from it."""
    weights = weights.to(gates)
    return (weights * (t * gates.abs() - (gates - gates.mean()).abs())).sum()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the next-token distributions, times ``temperature**2`` (Hinton et
    al.), so the gradient scale does not depend on the temperature."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain next-token cross-entropy: position ``i`` predicts token ``i + 1``."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].to(logits.device).flatten())


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """No model weight takes gradients while open; each weight's own ``requires_grad`` comes back after."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off, so the teacher and the gated student are the same network up to the gates."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def activation_checkpointing(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Recompute block activations in the backward pass instead of storing them (for long windows on big models).

    Hugging Face checkpoints a decoder layer only when ``layer.training`` is set, so that one flag is set on each
    layer (not ``.train()``, which would also turn on dropout inside it). Non-reentrant checkpointing needs no input
    that requires grad, so the embedding hook Hugging Face adds for that is removed at once (it would only add a
    backward pass through block 0). Everything is undone on exit, unless checkpointing was already on.
    """
    if not enabled or model.is_activation_checkpointing:
        yield
        return
    layers = adapter_for(model).layers(model)
    had_input_grad_hooks = bool(getattr(model, "_require_grads_hooks", None))
    model.activation_checkpointing_enable({"use_reentrant": False})
    if not had_input_grad_hooks:
        model.disable_input_require_grads()
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        model.activation_checkpointing_disable()


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


def _micro_batch_loss(model: PreTrainedModel, gates: BlockGates, ids: torch.Tensor, config: GateConfig) -> torch.Tensor:
    """The distillation (or LM) loss of one micro-batch; the teacher runs in the same step, without gradients."""
    if config.loss == "lm":
        return next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
    with torch.no_grad(), gates.bypassed():
        teacher_logits = model(input_ids=ids, use_cache=False).logits
    student_logits = model(input_ids=ids, use_cache=False).logits
    return distillation_loss(student_logits, teacher_logits, config.temperature)


def next_lambda(lam: float, gates: torch.Tensor, n_remove: int | None, config: GateConfig) -> float:
    """Budget control: raise ``lam`` while too few gates are closed, lower it while too many are."""
    if n_remove is None or config.lam_growth == 0:
        return lam
    closed = int((gates < config.closed_below).sum())
    if closed < n_remove:
        return lam * (1 + config.lam_growth)
    if closed > n_remove:
        return lam / (1 + config.lam_growth)
    return lam


def train_gates(
    model: PreTrainedModel, windows: torch.Tensor, config: GateConfig, seed: int, n_remove: int | None = None
) -> GateTrainingResult:
    """Train one gate per block on calibration ``windows`` ([n, seqlen] token ids); the model is unchanged after.

    ``n_remove`` is the removal target that budget control (``config.lam_growth > 0``) steers towards.
    """
    if windows.dim() != 2 or len(windows) == 0:
        raise FoldGPTError(f"gate training needs calibration windows of shape [n, seqlen], got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    weights = block_flops_weights(model).to(device)
    batches = window_batches(windows, config.micro_batch, seed)
    history: list[list[float]] = []
    totals: list[float] = []
    distills: list[float] = []
    regularizers: list[float] = []
    lambdas: list[float] = []
    lam = config.lam
    with ExitStack() as stack:
        stack.enter_context(frozen_weights(model))
        stack.enter_context(eval_mode(model))
        stack.enter_context(activation_checkpointing(model, config.gradient_checkpointing))
        gates = stack.enter_context(gated(model))
        optimizer = torch.optim.Adam([gates.values], lr=config.lr)
        progress = tqdm(range(1, config.steps + 1), desc="gates", leave=False)
        for step in progress:
            optimizer.zero_grad(set_to_none=True)
            distill = 0.0
            for _ in range(config.grad_accum):
                loss = _micro_batch_loss(model, gates, next(batches).to(device), config)
                _check_finite(loss, f"{config.loss} loss", step, config.steps)
                (loss / config.grad_accum).backward()
                distill += loss.item() / config.grad_accum
            regularizer = polarization_regularizer(gates.values, weights, config.t)
            _check_finite(regularizer, "polarization regularizer", step, config.steps)
            (lam * regularizer).backward()
            optimizer.step()
            with torch.no_grad():
                gates.values.clamp_(0.0, config.max_gate)
            history.append(gates.tolist())
            distills.append(distill)
            regularizers.append(regularizer.item())
            totals.append(distill + lam * regularizer.item())
            lambdas.append(lam)
            lam = next_lambda(lam, gates.values.detach(), n_remove, config)
            progress.set_postfix(loss=f"{totals[-1]:.4f}")
    return GateTrainingResult(
        gates=history[-1],
        gate_history=history,
        loss_history=totals,
        distill_history=distills,
        regularizer_history=regularizers,
        lambda_history=lambdas,
        flops_weights=weights.cpu().tolist(),
        config=config,
    )


def selection_from_gates(result: GateTrainingResult, n_remove: int) -> Selection:
    """Remove the ``n_remove`` blocks with the smallest final gates (ties: the earlier block)."""
    ranking = sorted(range(len(result.gates)), key=lambda i: (result.gates[i], i))
    return Selection(
        method="gates",
        removed=sorted(ranking[:n_remove]),
        scores=result.gates,
        details={
            "final_gates": result.gates,
            "gate_history": result.gate_history,
            "loss_history": result.loss_history,
            "distill_loss_history": result.distill_history,
            "regularizer_history": result.regularizer_history,
            "lambda_history": result.lambda_history,
            "flops_weights": result.flops_weights,
            "hyperparameters": asdict(result.config),
        },
    )


def select_by_gates_with(config: GateConfig) -> SelectionMethod:
    """A selection method with the given hyper-parameters (for the CLI's gate options)."""

    def select(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
        return selection_from_gates(train_gates(model, windows, config, seed, n_remove), n_remove)

    return select


@register("gates")
def select_by_gates(model: PreTrainedModel, windows: torch.Tensor, n_remove: int, seed: int) -> Selection:
    """FoldGPT's learnable gates with the default ``GateConfig``; ``details`` holds the gate trajectory."""
    return select_by_gates_with(GateConfig())(model, windows, n_remove, seed)

