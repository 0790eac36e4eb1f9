"""One healing step and the held-out evaluation: the student's loss terms against the teacher's outputs, their
weighted sum, and an optimiser step over ``grad_accum`` micro-batches (data-parallel: of this process)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from foldgpt.errors import FoldGPTError
from foldgpt.healing.config import LOSS_TERMS, HealConfig
from foldgpt.healing.data import WindowSchedule, learning_rate
from foldgpt.healing.teacher import Teacher, TeacherOutputs, recording_tail
from foldgpt.train.losses import distillation_loss, next_token_loss, tail_loss
from foldgpt.train.modes import autocast, module_modes, restore_modes
from foldgpt.train.parallel import DataParallel


def loss_terms(
    model: nn.Module, ids: torch.Tensor, teacher: TeacherOutputs, config: HealConfig, all_terms: bool = False
) -> dict[str, torch.Tensor]:
    """The student's forward pass and each loss term with a non-zero weight (every term with ``all_terms``)."""
    device = ids.device
    with recording_tail(model, config.tail_layers) as tail, autocast(device, config.bf16):
        logits = model(input_ids=ids, use_cache=False).logits
    if logits.shape[-1] != teacher.logits.shape[-1]:
        raise FoldGPTError(
            f"student and teacher vocabularies differ ({logits.shape[-1]} vs {teacher.logits.shape[-1]} logits); "
            "heal with the dense model the student was made from"
        )
    terms: dict[str, torch.Tensor] = {}
    if all_terms or config.kl_weight > 0:
        terms["kl"] = distillation_loss(logits, teacher.logits.to(logits.device), config.temperature)
    if all_terms or config.tail_weight > 0:
        terms["tail"] = tail_loss([tail[j] for j in range(config.tail_layers)], teacher.tail).to(logits.device)
    if all_terms or config.lm_weight > 0:
        terms["lm"] = next_token_loss(logits, ids.to(logits.device))
    return terms


def weighted_loss(terms: dict[str, torch.Tensor], config: HealConfig) -> torch.Tensor:
    """``kl_weight * kl + tail_weight * tail + lm_weight * lm`` over the terms present."""
    weights = {"kl": config.kl_weight, "tail": config.tail_weight, "lm": config.lm_weight}
    return sum((weights[name] * value for name, value in terms.items() if weights[name] > 0), torch.zeros(()))


def check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], step: int, steps: int) -> None:
    """Stop with a one-line error naming the step and the loss when training diverges."""
    if torch.isfinite(loss):
        return
    parts = ", ".join(f"{name} {value.item():.4g}" for name, value in terms.items())
    raise FoldGPTError(
        f"healing diverged at step {step}/{steps}: the loss is {loss.item()} ({parts}); lower --lr, check the student's "
        "weights for NaN/inf, or drop --bf16"
    )


@torch.no_grad()
def evaluate(model: nn.Module, teacher: Teacher, windows: torch.Tensor, config: HealConfig) -> dict[str, float]:
    """Mean loss terms on the held-out windows, and the student's perplexity there (``exp`` of the LM loss)."""
    if len(windows) == 0:
        return {}
    modes = module_modes(model)  # healing_mode's mix of modes (and activation checkpointing's layer flags) come back
    model.eval()
    device = teacher.device
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    try:
        for start in range(0, len(windows), config.micro_batch):
            indices = list(range(start, min(start + config.micro_batch, len(windows))))
            ids = windows[indices].to(device)
            terms = loss_terms(model, ids, teacher.outputs("eval", indices, ids), config, all_terms=True)
            for name, value in terms.items():
                sums[name] += value.item() * len(indices)
    finally:
        restore_modes(modes)
    means = {name: total / len(windows) for name, total in sums.items()}
    means["ppl"] = math.exp(min(means["lm"], 700.0))
    return means


def train_step(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    teacher: Teacher,
    windows: torch.Tensor,
    schedule: WindowSchedule,
    step: int,
    config: HealConfig,
    device: torch.device,
    parallel: DataParallel | None = None,
) -> dict:
    """One optimiser step over ``grad_accum`` micro-batches (of this process; data-parallel: gradients and the
    recorded losses are averaged over the processes); returns the step's loss terms and learning rate."""
    lr = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    rank = parallel.rank if parallel else 0
    for micro in range(config.grad_accum):
        indices = schedule.indices(step, micro, config, rank)
        ids = windows[indices].to(device)
        # data-parallel: gradients are all-reduced only in the step's last backward pass
        with parallel.no_sync(model, sync=micro == config.grad_accum - 1) if parallel else nullcontext():
            terms = loss_terms(model, ids, teacher.outputs("train", indices, ids), config)
            loss = weighted_loss(terms, config)
            check_finite(loss, terms, step, config.total_steps)
            if parallel:
                parallel.backward(loss / config.grad_accum)
            else:
                (loss / config.grad_accum).backward()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.item() / config.grad_accum
    grad_norm = None
    if config.max_grad_norm > 0:
        if parallel:
            grad_norm = parallel.clip_grad_norm(model, list(params.values()), config.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm).item()
    optimizer.step()
    if parallel:
        sums = parallel.mean(sums)
    return {"step": step, **sums, "lr": lr, "grad_norm": grad_norm}
