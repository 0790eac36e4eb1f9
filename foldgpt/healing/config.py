"""Hyper-parameters of distillation healing."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from foldgpt.core.settings import setting
from foldgpt.errors import FoldGPTError

LOSS_TERMS = ("kl", "tail", "lm")

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES = get_args(Schedule)


# fields that change how a run is driven or recorded, not its result: a checkpoint may be resumed with other values
RUN_CONTROL_FIELDS = ("steps", "tokens", "eval_every", "checkpoint_every", "teacher_cache")


@dataclass(frozen=True)
class HealConfig:
    """Hyper-parameters of distillation healing (see the module docstring for the loss).

    Budget: ``steps`` optimiser steps, or ``tokens`` (rounded up to whole steps) when given; each step sees
    ``micro_batch * grad_accum`` windows of ``seqlen`` tokens. The learning rate warms up linearly for
    ``warmup_steps`` and then follows ``schedule`` (cosine / linear decay towards 0, or constant). Gradients are
    clipped to ``max_grad_norm`` (0: off). LoRA: rank ``lora_rank``, scale ``lora_alpha / lora_rank``, on the linear
    layers named in ``target_modules`` of every block (None: every projection, the family adapter's ``lora_targets``).
    ``eval_every`` steps (and before and after training) the held-out windows are scored. ``teacher_cache`` is a
    folder for the teacher's outputs (logits stored as float16). ``steps=0`` heals nothing: ``compress`` skips its
    healing stage, and ``foldgpt heal`` refuses it.

    ``world_size`` is the number of data-parallel processes (``accelerate launch`` / ``torchrun``); ``heal`` sets it
    from the launcher, so leave it at 1. A step then sees ``micro_batch * grad_accum * world_size`` windows (the
    global batch), each process ``micro_batch * grad_accum`` of them; see ``foldgpt.distributed``.

    Defaults measured with ``benchmarks/healing.py`` (SmolLM2-135M, 8,192 Alpaca tokens, results in
    ``benchmarks/results/healing.json``): on the folded student, KL + tail + LM beat KL + tail and KL alone
    (WikiText-2 perplexity 5,085 vs 6,779 vs 10,640), and ``lr=5e-3`` beat ``1e-3`` (5,085 vs 68,149); on the pruned
    student the two rates were on par (51.3 vs 50.8). Short budgets want the higher rate. Windows of 1,024 tokens
    (the evaluation's length) beat 256 at the same token budget: 6 blocks removed by the gates heal to WikiText-2
    47.49 against 49.97 (mean of 3 seeds, 8,192 tokens) and 46.69 against 51.11 (25,600 tokens), hence 25 steps of
    1,024 tokens, the same 25,600 tokens as the former 100 x 256 (``benchmarks/results/healing_seqlen1024*.json``).
    """

    data: str = setting("alpaca", metavar="DATA", help="alpaca (5000 records in the Stanford Alpaca template), wikitext2, "
                        "ptb (their validation splits), or a .txt/.jsonl/.json file")
    steps: int = setting(25, exclusive="budget", help="optimiser steps (compress: 0 skips healing)")
    tokens: int | None = setting(None, metavar="N", exclusive="budget", none_means="{steps} decides",
                                 help="train on N tokens instead (rounded up to whole steps)")
    seqlen: int = setting(1024, help="tokens per training window")
    micro_batch: int = setting(1, help="windows per forward pass")
    grad_accum: int = setting(1, help="micro-batches per optimiser step")
    lr: float = setting(5e-3, help="peak AdamW learning rate")
    schedule: Schedule = setting("cosine", help="learning-rate decay after warm-up")
    warmup_steps: int = setting(0, help="linear warm-up steps")
    max_grad_norm: float = setting(1.0, help="gradient clipping, 0 = off")
    lora_rank: int = setting(8, help="LoRA rank r (one adapter per block position; base weights frozen)")
    lora_alpha: float = setting(16.0, help="LoRA alpha; the delta is scaled by alpha/r")
    lora_dropout: float = setting(0.0, help="dropout on the LoRA input; the model's own dropout stays off while healing")
    target_modules: tuple[str, ...] | None = setting(None, flag="lora-targets", metavar="NAMES",
                                                     none_means="every projection of the family's blocks",
                                                     help="comma-separated linear layers of each block to adapt, e.g. "
                                                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj for Llama")
    train_norms: bool = setting(True, help="train the per-block norms too (off: LoRA only)")
    train_tie_deltas: bool = setting(False, help="a tied model (fold --ties, --fold auto): train the children's fitted "
                                     "deltas too, at the heal's learning rate (off: they stay as the local fit left "
                                     "them; docs/results/fold-vs-remove.md)")
    kl_weight: float = setting(1.0, help="weight of KL(teacher || student, T) on logits, 0 = off")
    temperature: float = setting(1.0, help="KL temperature T")
    tail_weight: float = setting(1.0, help="weight of the tail-layer loss (relative MSE of the last k block outputs), 0 = off")
    tail_layers: int = setting(3, help="k, the number of last blocks the tail loss compares")
    lm_weight: float = setting(1.0, help="weight of the next-token loss on the data, 0 = off")
    eval_every: int = setting(0, metavar="N", help="score the held-out windows every N steps (always before and after; "
                              "0 = only then)")
    eval_windows: int = setting(4, help="held-out windows, never trained on")
    seed: int = setting(0, help="seed for the window order and LoRA initialisation")
    bf16: bool = setting(False, help="bfloat16 autocast for student and teacher forward passes (CPU or GPU)")
    gradient_checkpointing: bool = setting(False, help="recompute block activations in backward to save memory")
    teacher_cache: str | None = setting(None, metavar="DIR", none_means="computed on the fly",
                                        help="cache the teacher's outputs in DIR (float16 logits, one file per window) and "
                                        "reuse them in later runs on the same data")
    checkpoint_every: int = setting(10, metavar="N", help="write a checkpoint every N steps, 0 = only on Ctrl-C / SIGTERM")
    world_size: int = setting(1, internal=True, help="data-parallel processes; heal sets it from the launcher")

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.steps < 0:
            raise FoldGPTError(f"healing needs steps >= 0 (0: none, compress skips the stage), got {self.steps}")
        for name in ("seqlen", "micro_batch", "grad_accum", "lora_rank", "tail_layers", "world_size"):
            if getattr(self, name) < 1:
                raise FoldGPTError(f"healing needs {name} >= 1, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise FoldGPTError(f"healing needs seqlen >= 2, got {self.seqlen}")
        if self.tokens is not None and self.tokens < 1:
            raise FoldGPTError(f"healing needs tokens >= 1, got {self.tokens}")
        for name in ("warmup_steps", "eval_every", "eval_windows", "checkpoint_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise FoldGPTError(f"healing needs {name} >= 0, got {getattr(self, name)}")
        for name in ("kl_weight", "tail_weight", "lm_weight"):
            if getattr(self, name) < 0:
                raise FoldGPTError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.kl_weight == self.tail_weight == self.lm_weight == 0:
            raise FoldGPTError("all loss weights are 0; give --kl-weight, --tail-weight or --lm-weight above 0")
        for name in ("lr", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise FoldGPTError(f"healing needs {name} > 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise FoldGPTError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.schedule not in SCHEDULES:
            raise FoldGPTError(f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if self.target_modules is not None and not self.target_modules:
            raise FoldGPTError("give at least one LoRA target module, e.g. q_proj,v_proj")

    @property
    def windows_per_step(self) -> int:
        """The global batch: windows per optimiser step over all data-parallel processes."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.seqlen

    @property
    def total_steps(self) -> int:
        """``steps``, or the steps needed to see ``tokens`` training tokens."""
        return self.steps if self.tokens is None else math.ceil(self.tokens / self.tokens_per_step)

    def result_fields(self) -> dict:
        """The fields that determine the trained weights (compared when resuming)."""
        fields = asdict(self)
        for name in RUN_CONTROL_FIELDS:
            fields.pop(name)
        fields["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        fields["total_steps"] = self.total_steps
        return fields
