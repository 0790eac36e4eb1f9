"""Training losses shared by gate training and healing: distillation KL, next-token loss, tail-layer MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def tail_loss(student_tail: list[torch.Tensor], teacher_tail: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j mean((s_j - t_j)^2) / mean(t_j^2)`` over the last ``k`` block outputs (0 when they agree)."""
    total = torch.zeros((), device=teacher_tail[0].device)
    for student, teacher in zip(student_tail, teacher_tail, strict=True):
        teacher = teacher.to(total.device)
        total = total + F.mse_loss(student.float().to(total.device), teacher) / teacher.pow(2).mean().clamp_min(1e-12)
    return total
