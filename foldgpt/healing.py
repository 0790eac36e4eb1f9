"""Distillation healing (FoldGPT section 4): LoRA per block position plus tail-layer distillation from the dense model.

The student (a pruned and possibly folded model) gets one peft LoRA adapter on every targeted linear projection of
every block position -- a folded model's children are separate module objects, so each gets its own low-rank delta
on top of the parent's shared weight -- and its per-block norms (``input_layernorm``, ..., ``q_norm``/``k_norm``)
become trainable. Every base weight stays frozen, so shared tensors stay shared and unchanged. The loss is

    kl_weight * T^2 KL(teacher || student at temperature T)            (next-token distributions)
  + tail_weight * sum_{j=1..k} ||s_j - t_j||^2 / ||t_j||^2               (tail-layer distillation)
  + lm_weight * cross-entropy of the next token                          (the data itself)

where ``s_j`` / ``t_j`` are the outputs of the student's / teacher's ``j``-th last block (before the final norm); the
squared error is divided by the teacher's mean square so its scale does not depend on the model's hidden-state size
(it is a relative MSE: 0 when the tails agree, 1 when the student outputs zeros). The student trains with its base
model in eval mode, like the teacher (the config's dropout off); only LoRA's own ``lora_dropout`` is active
(``healing_mode``).

Training data: the text (Alpaca records rendered with ``foldgpt.data.ALPACA_TEMPLATE`` and joined by a blank line, or
any plain text) is tokenised as one stream and cut into non-overlapping windows of ``seqlen`` tokens, which are
shuffled with the seed; the first ``eval_windows`` are held out for evaluation, the others are visited in order (a
fresh seeded permutation per pass). Which windows a step sees is a function of the step number only, so a resumed run
sees exactly what an uninterrupted one would. Under ``accelerate launch`` / ``torchrun`` with ``W`` processes a step's
global batch is ``micro_batch * grad_accum * W`` windows, split over the ranks, with gradients averaged over them
(DDP, or FSDP from the accelerate config; ``foldgpt.distributed``): the same weights as one process with
``grad_accum * W``, up to float rounding. Only rank 0 writes checkpoints and outputs.

Long runs: a checkpoint (trainable tensors, optimiser state, RNG state, history) is written atomically every
``checkpoint_every`` steps and on Ctrl-C or SIGTERM (after the step in progress finishes); ``resume=True`` continues
from it to the same weights as an uninterrupted run. The teacher's outputs are computed on the fly, or cached on disk once
(``teacher_cache``) and reused by later runs on the same data (e.g. healing several students).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from foldgpt import __version__
from foldgpt.artifacts import atomic_output_dir, check_output_free, read_metadata
from foldgpt.data import load_text, tokenize
from foldgpt.distributed import DataParallel
from foldgpt.errors import FoldGPTError
from foldgpt.importance.gates import activation_checkpointing, distillation_loss, next_token_loss
from foldgpt.models import adapter_for
from foldgpt.models.adapters import linear_layers_by_name
from foldgpt.models.loading import LoadedModel

LOSS_TERMS = ("kl", "tail", "lm")
SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINT_FILE = "checkpoint.pt"
CACHE_MANIFEST = "teacher_cache.json"
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
    folder for the teacher's outputs (logits stored as float16).

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

    data: str = "alpaca"
    steps: int = 25
    tokens: int | None = None
    seqlen: int = 1024
    micro_batch: int = 1
    grad_accum: int = 1
    lr: float = 5e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    train_norms: bool = True
    kl_weight: float = 1.0
    temperature: float = 1.0
    tail_weight: float = 1.0
    tail_layers: int = 3
    lm_weight: float = 1.0
    eval_every: int = 0
    eval_windows: int = 4
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    teacher_cache: str | None = None
    checkpoint_every: int = 10
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("steps", "seqlen", "micro_batch", "grad_accum", "lora_rank", "tail_layers", "world_size"):
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


@dataclass
class HealResult:
    """The healed student (a peft model; reloaded from ``out`` when one was written), and what happened."""

    loaded: LoadedModel
    metadata: dict
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    completed: bool = True


# ----------------------------------------------------------------------------------------------------------- data


def healing_windows(tokenizer, spec: str, seqlen: int, eval_count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data cut into non-overlapping ``seqlen`` windows, shuffled with ``seed``: (training windows, held-out ones)."""
    ids = tokenize(tokenizer, load_text(spec, "calibration"))
    count = len(ids) // seqlen
    if count < eval_count + 1:
        raise FoldGPTError(
            f"healing data '{spec}' has {len(ids)} tokens: {count} windows of {seqlen}, but {eval_count} held-out windows "
            "plus at least 1 training window are needed; use more text, a smaller --seqlen or fewer --eval-windows"
        )
    windows = ids[: count * seqlen].view(count, seqlen)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return windows[order[eval_count:]], windows[order[:eval_count]]


class WindowSchedule:
    """Which training windows each step's micro-batches see: position ``p`` of the run is window ``perm_e[p % n]``,
    with one seeded permutation per pass ``e = p // n`` -- a pure function of the step, so resuming is exact."""

    def __init__(self, count: int, seed: int) -> None:
        self.count = count
        self.seed = seed
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            if epoch == 0:
                self._permutations[0] = list(range(self.count))  # already shuffled by healing_windows
            else:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._permutations[epoch] = torch.randperm(self.count, generator=generator).tolist()
        return self._permutations[epoch]

    def indices(self, step: int, micro: int, config: HealConfig, rank: int = 0) -> list[int]:
        """Window indices of micro-batch ``micro`` of ``step`` (1-based) on data-parallel process ``rank``: the step's
        ``grad_accum * world_size`` micro-batches in order, ``grad_accum`` consecutive ones per rank."""
        first = (((step - 1) * config.world_size + rank) * config.grad_accum + micro) * config.micro_batch
        return [self._permutation(p // self.count)[p % self.count] for p in range(first, first + config.micro_batch)]


def learning_rate(step: int, config: HealConfig) -> float:
    """The learning rate of ``step`` (1-based): linear warm-up, then the schedule's decay (never exactly 0)."""
    total = config.total_steps
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    progress = (step - config.warmup_steps - 1) / max(1, total - config.warmup_steps)
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------- trainable parts


def add_lora(model: PreTrainedModel, config: HealConfig) -> nn.Module:
    """Wrap ``model`` in place with one LoRA adapter per targeted linear layer of every block position; base frozen,
    norms trainable (``config.train_norms``). Returns the peft model."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    targets = lora_targets(model, config)
    linear = linear_layers_by_name(model)
    missing = [name for name in targets if name not in linear]
    if missing:
        raise FoldGPTError(
            f"LoRA target module(s) {', '.join(missing)} not found in the model; it has linear layers named {', '.join(sorted(linear))}"
        )
    torch.manual_seed(config.seed)  # LoRA's A matrices are initialised at random
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only scales by alpha / r
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        fan_in_fan_out=isinstance(linear[targets[0]], Conv1D),  # GPT-2's Conv1D stores its weight transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft still asks transformers for the deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    if config.train_norms:
        for parameter in norm_parameters(model):
            parameter.requires_grad_(True)
    return peft_model


@contextmanager
def healing_mode(model: nn.Module) -> Iterator[None]:
    """The mode healing trains in: the base model in eval mode (its dropout off), LoRA's own dropout on.

    The base weights are frozen and the student is fitted to the teacher, which runs in eval mode: the dropout of
    configs that have one (GPT-2's ``resid_pdrop`` / ``embd_pdrop`` / ``attn_pdrop``, OPT's ``dropout`` /
    ``attention_dropout``, ...) would only add noise to that comparison, as in gate training's ``eval_mode``.
    ``HealConfig.lora_dropout`` is a separate, intended regulariser of the adapters' inputs: peft implements it as
    ``nn.Dropout`` modules in each LoRA layer's ``lora_dropout`` ModuleDict (``nn.Identity`` when it is 0), which
    ``model.eval()`` switches off too, so exactly those modules are put back in train mode. Every module's previous
    mode is restored on exit. Enter it before ``activation_checkpointing``, which sets the decoder layers' own
    ``training`` flag (what Hugging Face checks before checkpointing a layer).
    """
    modes = module_modes(model)
    model.eval()
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, nn.ModuleDict):
            dropout.train()
    try:
        yield
    finally:
        restore_modes(modes)


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module of ``model`` with its ``training`` flag, for ``restore_modes``."""
    return [(module, module.training) for module in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Set each module's own ``training`` flag back (not ``.train()``, which would set its children's too)."""
    for module, training in modes:
        module.training = training


def lora_targets(model: nn.Module, config: HealConfig) -> tuple[str, ...]:
    """The linear layers LoRA adapts: ``config.target_modules``, or every projection of the family's blocks."""
    if config.target_modules is not None:
        return config.target_modules
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return adapter_for(base).lora_targets


def norm_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """The weights of every block position's norms: the adapter's per-block norms plus any norm inside the block
    (``q_norm`` / ``k_norm`` of Qwen3 and Gemma 3), each Parameter once."""
    adapter = adapter_for(model)
    found: dict[int, nn.Parameter] = {}
    for block in adapter.layers(model):
        modules = list(adapter.block_norms(block))
        modules += [m for m in block.modules() if type(m).__name__.endswith("Norm") and not isinstance(m, nn.Linear)]
        for module in modules:
            for parameter in module.parameters():
                found.setdefault(id(parameter), parameter)
    return list(found.values())


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable Parameter by its (first) name, in a fixed order (the optimiser's and the checkpoint's)."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


# ------------------------------------------------------------------------------------------------ teacher, losses


@dataclass
class TeacherOutputs:
    """The teacher's logits and the outputs of its last ``k`` blocks (oldest first) for one micro-batch."""

    logits: torch.Tensor
    tail: list[torch.Tensor]


@contextmanager
def recording_tail(model: nn.Module, k: int) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of the last ``k`` blocks of ``model`` (a HF or peft model) into a dict ``{j: hidden}``, ``j``
    counting from the first of them; a dict, so recomputation under activation checkpointing just overwrites."""
    base = _base_model(model)
    layers = adapter_for(base).layers(base)
    if k > len(layers):
        raise FoldGPTError(f"--tail-layers {k} is more than the model's {len(layers)} blocks; use at most {len(layers)}")
    record: dict[int, torch.Tensor] = {}

    def hook_for(j: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            record[j] = output if isinstance(output, torch.Tensor) else output[0]

        return hook

    handles = [layers[len(layers) - k + j].register_forward_hook(hook_for(j)) for j in range(k)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a peft model, itself possibly inside a DDP / FSDP wrapper (``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = getattr(model, "module")  # noqa: B009 (torch types the attribute as Tensor | Module)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the model's device (CPU or GPU), or nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


class Teacher:
    """The dense model's outputs for a micro-batch, computed on the fly or read from (and written to) a disk cache.

    A cache folder holds one safetensors file per window (``train-000012.safetensors``: logits as float16 and the
    tail outputs as float32) and ``teacher_cache.json`` with the settings it was built for; a cache built for other
    settings (teacher, data, seqlen, seed, held-out windows, tail layers, bf16) is refused.
    """

    def __init__(self, loaded: LoadedModel, config: HealConfig, cache: Path | None, key: dict) -> None:
        self.model = loaded.model
        self.config = config
        self.device = next(self.model.parameters()).device
        self.cache = cache
        self.hits = 0
        self.computed = 0
        if cache is not None:
            self._open_cache(cache, key)

    def _open_cache(self, cache: Path, key: dict) -> None:
        manifest = cache / CACHE_MANIFEST
        if manifest.is_file():
            stored = json.loads(manifest.read_text())
            if stored != key:
                raise FoldGPTError(f"teacher cache '{cache}' was built for other settings; give another --teacher-cache folder or delete it")
        else:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(key, indent=2) + "\n")
            os.replace(tmp, manifest)

    @torch.no_grad()
    def compute(self, ids: torch.Tensor) -> TeacherOutputs:
        """Run the teacher (no gradients) and record its tail."""
        with recording_tail(self.model, self.config.tail_layers) as tail, autocast(self.device, self.config.bf16):
            logits = self.model(input_ids=ids.to(self.device), use_cache=False).logits
        self.computed += len(ids)
        return TeacherOutputs(logits=logits.float(), tail=[tail[j].float() for j in range(self.config.tail_layers)])

    def outputs(self, split: str, indices: list[int], ids: torch.Tensor) -> TeacherOutputs:
        """The teacher's outputs for windows ``indices`` of ``split`` (``ids`` are their tokens)."""
        if self.cache is None:
            return self.compute(ids)
        paths = [self.cache / f"{split}-{index:06d}.safetensors" for index in indices]
        if not all(path.is_file() for path in paths):
            fresh = self.compute(ids)
            for row, path in enumerate(paths):
                tensors = {"logits": fresh.logits[row].half().contiguous()}
                tensors.update({f"tail.{j}": t[row].contiguous() for j, t in enumerate(fresh.tail)})
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per data-parallel process
                save_file(tensors, str(tmp))
                os.replace(tmp, path)
        loaded = [load_file(str(path)) for path in paths]
        self.hits += len(paths)
        return TeacherOutputs(
            logits=torch.stack([item["logits"] for item in loaded]).float().to(self.device),
            tail=[torch.stack([item[f"tail.{j}"] for item in loaded]).to(self.device) for j in range(self.config.tail_layers)],
        )


def tail_loss(student_tail: list[torch.Tensor], teacher_tail: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j mean((s_j - t_j)^2) / mean(t_j^2)`` over the last ``k`` block outputs (0 when they agree)."""
    total = torch.zeros((), device=teacher_tail[0].device)
    for student, teacher in zip(student_tail, teacher_tail, strict=True):
        teacher = teacher.to(total.device)
        total = total + F.mse_loss(student.float().to(total.device), teacher) / teacher.pow(2).mean().clamp_min(1e-12)
    return total


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


# --------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write a checkpoint atomically: a temporary file ``os.replace``-d over ``checkpoint.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path, expected: dict) -> dict:
    """The checkpoint in ``folder``, refused if it was written for another student, teacher or configuration."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise FoldGPTError(f"--resume: no checkpoint in '{folder}'; run without --resume to start, or give --checkpoint-dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as error:
        raise FoldGPTError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}; delete it and start again") from error
    stored = state.get("identity", {})
    if isinstance(stored.get("config"), dict):
        stored["config"].setdefault("world_size", 1)  # written before data-parallel runs existed: one process
    for name, value in expected.items():
        if stored.get(name) == value:
            continue
        if isinstance(value, dict) and isinstance(stored.get(name), dict):
            differing = [key for key in value if stored[name].get(key) != value[key]]
            what = ", ".join(f"{key} {stored[name].get(key)!r} (now {value[key]!r})" for key in differing)
        else:
            what = f"{stored.get(name)!r} (now {value!r})"
        raise FoldGPTError(
            f"--resume: the checkpoint in '{folder}' was written with another {name}: {what}; resume with the same "
            "settings or start without --resume"
        )
    return state


DEFERRED_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@contextmanager
def deferred_interrupt() -> Iterator[dict]:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a flag checked between steps; a second one interrupts at once.

    SIGTERM is what a scheduler or ``kill`` sends (the CLI maps it to ``KeyboardInterrupt``), so it too finishes the
    step in progress and writes a checkpoint. A signal that is ignored (``SIG_IGN``) or handled outside Python stays
    as it is. The previous handlers are restored on exit (and before the second signal interrupts).
    """
    flag = {"interrupted": False}
    if not _in_main_thread():
        yield flag
        return
    previous = {signum: signal.getsignal(signum) for signum in DEFERRED_SIGNALS}
    deferred = [signum for signum, handler in previous.items() if handler not in (signal.SIG_IGN, None)]

    def restore() -> None:
        for signum in deferred:
            signal.signal(signum, previous[signum])

    def handler(signum, frame) -> None:
        if flag["interrupted"]:
            restore()
            raise KeyboardInterrupt
        flag["interrupted"] = True
        name = DEFERRED_SIGNALS.get(signum, "signal")
        print(f"\nfoldgpt: {name}: finishing the current step and writing a checkpoint (Ctrl-C or SIGTERM again to abort)",
              file=sys.stderr)

    for signum in deferred:
        signal.signal(signum, handler)
    try:
        yield flag
    finally:
        restore()


def _in_main_thread() -> bool:
    import threading  # noqa: PLC0415

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------------------ workflow


def heal(
    student: LoadedModel,
    teacher: LoadedModel,
    config: HealConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    plain: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
) -> HealResult:
    """Heal ``student`` (pruned, possibly folded) by distillation from ``teacher`` (the dense model), in place.

    Writes a compact folder to ``out`` if given (the shared base once, the trained norms, ``adapter/`` with the LoRA
    adapters; ``foldgpt.load`` reads it) and, with ``plain``, also ``out/plain``: a vanilla HF folder with the
    adapters merged per position. Checkpoints go to ``checkpoint_dir`` (default ``<out>.checkpoint``; removed after
    a successful run); ``resume`` continues from the one there. ``stop_after_steps`` ends the run early after that
    many steps of this call, with a checkpoint and ``completed=False`` (a simulated interruption).
    """
    from foldgpt.sublayers import refuse_removed_sublayers  # noqa: PLC0415

    refuse_removed_sublayers(student.model, "healing")
    config = config or HealConfig()
    out = Path(out) if out is not None else None
    if out is not None:
        check_output_free(out, overwrite)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else (Path(f"{out}.checkpoint") if out else None)
    if resume and checkpoint_dir is None:
        raise FoldGPTError("--resume needs a checkpoint folder: give --out (its checkpoint is <out>.checkpoint) or --checkpoint-dir")
    _check_models(student, teacher, config)
    parallel = DataParallel.from_environment()
    config = _with_world_size(config, parallel, student, teacher, resume)
    rank, is_main = (parallel.rank, parallel.is_main) if parallel else (0, True)
    base_dtype = next(student.model.parameters()).dtype
    if parallel is not None:  # one replica per process, on its own device; FSDP moves and shards block by block
        if not parallel.fsdp:
            student.model.to(parallel.device)
        teacher = LoadedModel(model=parallel.prepare_frozen(teacher.model), tokenizer=teacher.tokenizer, source=teacher.source)
    device = parallel.device if parallel else next(student.model.parameters()).device
    total = config.total_steps
    train_windows, eval_windows = healing_windows(student.tokenizer, config.data, config.seqlen, config.eval_windows, config.seed)
    schedule = WindowSchedule(len(train_windows), config.seed)
    cache_key = {"teacher": teacher.source, "data": config.data, "seqlen": config.seqlen, "seed": config.seed,
                 "eval_windows": config.eval_windows, "tail_layers": config.tail_layers, "bf16": config.bf16,
                 "windows": len(train_windows)}
    teacher_outputs = Teacher(teacher, config, Path(config.teacher_cache) if config.teacher_cache else None, cache_key)
    identity = {"student": student.source, "teacher": teacher.source, "config": config.result_fields()}

    model = add_lora(student.model, config)
    params = trainable_parameters(model)
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    training_model = model  # under a launcher: the DDP / FSDP wrapper around it
    if parallel is not None:
        training_model, optimizer = parallel.prepare(model, optimizer)
    history: list[dict] = []
    evals: list[dict] = []
    start_step, seconds_before = 0, 0.0
    if resume:
        assert checkpoint_dir is not None  # heal() refuses --resume without a checkpoint folder
        state = load_checkpoint(checkpoint_dir, identity)
        start_step, history, evals, seconds_before = _restore(state, params, optimizer, rank)
        if is_main:
            print(f"foldgpt: resuming from step {start_step}/{total} ({checkpoint_dir})", file=sys.stderr)
    else:
        torch.manual_seed(config.seed + rank)  # rank 0 (and a single process) as before; other ranks their own LoRA dropout
        evals.append({"step": 0, **evaluate(training_model, teacher_outputs, eval_windows, config)})

    def checkpoint(step: int, seconds: float) -> None:
        if checkpoint_dir is None:
            return
        if parallel is not None and parallel.fsdp:
            trainable = parallel.full_state(training_model, list(params))
        else:
            trainable = {name: p.detach().clone() for name, p in params.items()}
        rng_ranks = parallel.gather_object(torch.get_rng_state()) if parallel else None
        if is_main:  # only rank 0 writes; the others wait for it
            state = {
                "identity": identity, "step": step, "seconds": seconds, "trainable": trainable,
                "optimizer": None if parallel is not None and parallel.fsdp else optimizer.state_dict(),
                "rng": torch.get_rng_state(), "history": history, "evals": evals,
            }
            if rng_ranks is not None:
                state["rng_ranks"] = rng_ranks
            save_checkpoint(checkpoint_dir, state)
        if parallel is not None:
            parallel.barrier()

    run_start = time.perf_counter()
    step = start_step
    completed = True
    with ExitStack() as stack:
        stack.enter_context(healing_mode(training_model))  # base dropout off, LoRA dropout as configured
        stack.enter_context(activation_checkpointing(model.get_base_model(), config.gradient_checkpointing))
        interrupt = stack.enter_context(deferred_interrupt())
        progress = stack.enter_context(tqdm(total=total, initial=start_step, desc="heal", leave=False, dynamic_ncols=True,
                                            disable=None if is_main else True))
        for step in range(start_step + 1, total + 1):
            step_start = time.perf_counter()
            record = _train_step(training_model, params, optimizer, teacher_outputs, train_windows, schedule, step, config,
                                 device, parallel)
            record["seconds"] = time.perf_counter() - step_start
            history.append(record)
            elapsed = time.perf_counter() - run_start
            rate = (step - start_step) * config.tokens_per_step / max(elapsed, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:.0f}")
            if config.eval_every and step % config.eval_every == 0 and step != total:
                evals.append({"step": step, **evaluate(training_model, teacher_outputs, eval_windows, config)})
            stop_now = stop_after_steps is not None and step - start_step >= stop_after_steps and step != total
            interrupted = parallel.any(interrupt["interrupted"]) if parallel else interrupt["interrupted"]
            if interrupted or stop_now or (config.checkpoint_every and step % config.checkpoint_every == 0):
                checkpoint(step, seconds_before + time.perf_counter() - run_start)
            if interrupted:
                where = f"; checkpoint in {checkpoint_dir}, re-run with --resume to continue" if checkpoint_dir else ""
                if is_main:
                    print(f"foldgpt: healing interrupted after step {step}/{total}{where}", file=sys.stderr)
                raise KeyboardInterrupt
            if stop_now:
                completed = False
                break
    training_model.eval()
    train_seconds = time.perf_counter() - run_start
    if completed:
        evals.append({"step": step, **evaluate(training_model, teacher_outputs, eval_windows, config)})
    metadata = _metadata(student, teacher, config, model, history, evals, train_seconds, seconds_before, start_step,
                         teacher_outputs)
    result = HealResult(loaded=LoadedModel(model=model, tokenizer=student.tokenizer, source=student.source),
                        metadata=metadata, history=history, evals=evals, completed=completed)
    if completed and out is not None:
        if parallel is None:
            result.loaded = save_healed(result.loaded, out, metadata, overwrite=overwrite, plain=plain)
        else:  # rank 0 writes (under FSDP from the gathered tensors, on a CPU copy); the others wait and keep theirs
            gathered = parallel.full_state(training_model, list(params)) if parallel.fsdp else None
            if is_main:
                loaded = result.loaded if gathered is None else _rebuilt_on_cpu(student, config, gathered, base_dtype)
                result.loaded = save_healed(loaded, out, metadata, overwrite=overwrite, plain=plain)
            parallel.barrier()
    if completed and is_main and checkpoint_dir is not None and out is not None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result


def _with_world_size(config: HealConfig, parallel: DataParallel | None, student: LoadedModel, teacher: LoadedModel,
                     resume: bool) -> HealConfig:
    """``config`` with the launcher's number of processes; refuses what data-parallel runs cannot do."""
    if parallel is None:
        if config.world_size != 1:
            raise FoldGPTError(
                f"world_size {config.world_size} needs that many processes: start them with 'accelerate launch' or "
                "'torchrun' (heal sets world_size from the launcher; leave it at 1)"
            )
        return config
    if config.world_size not in (1, parallel.world):
        raise FoldGPTError(f"world_size {config.world_size} but the launcher started {parallel.world} processes; leave it at 1")
    if any(_spread_over_devices(loaded.model) for loaded in (student, teacher)):
        raise FoldGPTError(
            "--device-map spreads one model over the devices of one process; a data-parallel launch (accelerate launch, "
            "torchrun) gives each process its own device instead: use one or the other"
        )
    if resume and parallel.fsdp:
        raise FoldGPTError("--resume is not supported under FSDP (its checkpoints hold no optimiser state); use DDP or restart")
    if config.teacher_cache and parallel.fsdp:  # a rank finding a window cached would skip the teacher's all-gathers
        raise FoldGPTError("--teacher-cache is not supported under FSDP; drop it (the teacher runs on the fly)")
    return replace(config, world_size=parallel.world)


def _spread_over_devices(model: nn.Module) -> bool:
    """Whether ``model`` was loaded with a device map over more than one device."""
    placement = getattr(model, "hf_device_map", None) or {}
    return len(set(placement.values())) > 1


def _rebuilt_on_cpu(student: LoadedModel, config: HealConfig, trainable: dict[str, torch.Tensor], dtype: torch.dtype) -> LoadedModel:
    """The student reloaded from its folder on the CPU with LoRA and the trained tensors (after FSDP sharded it)."""
    from foldgpt.models.loading import load_model  # noqa: PLC0415

    fresh = load_model(student.source, dtype=_dtype_name(dtype), device="cpu")
    model = add_lora(fresh.model, config)
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if parameters[name].requires_grad and name not in trainable]
    if missing:
        raise FoldGPTError(f"the gathered FSDP state lacks {len(missing)} trained tensors (e.g. {missing[0]}); cannot save")
    with torch.no_grad():
        for name, value in trainable.items():
            parameters[name].copy_(value)
    return LoadedModel(model=model, tokenizer=fresh.tokenizer, source=student.source)


def _check_models(student: LoadedModel, teacher: LoadedModel, config: HealConfig) -> None:
    """Refuse students that already carry adapters, a teacher that is the student, and too many tail layers."""
    if hasattr(student.model, "peft_config") or hasattr(student.model, "get_base_model"):
        raise FoldGPTError(
            f"'{student.source}' is already healed (it has a LoRA adapter); heal the folded or pruned folder it came from, "
            "or export it with --plain first"
        )
    if student.model is teacher.model:
        raise FoldGPTError("the teacher is the student model object; load the dense teacher separately")
    for role, loaded in (("student", student), ("teacher", teacher)):
        model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        depth = len(adapter_for(model).layers(model))
        if config.tail_layers > depth:
            raise FoldGPTError(f"--tail-layers {config.tail_layers} is more than the {role}'s {depth} blocks; use at most {depth}")
    teacher.model.eval()
    teacher.model.requires_grad_(False)


def _restore(state: dict, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, rank: int = 0) -> tuple[int, list, list, float]:
    """Load a checkpoint's trainable tensors, optimiser and RNG state (data-parallel: this rank's); returns (step,
    history, evals, seconds)."""
    stored = state["trainable"]
    if set(stored) != set(params):
        raise FoldGPTError("--resume: the checkpoint's trainable tensors do not match this model; start without --resume")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(stored[name])
    optimizer.load_state_dict(state["optimizer"])
    rng_ranks = state.get("rng_ranks")
    torch.set_rng_state(rng_ranks[rank] if rng_ranks else state["rng"])
    return state["step"], list(state["history"]), list(state["evals"]), float(state["seconds"])


def _train_step(
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


def _metadata(student, teacher, config, model, history, evals, seconds, seconds_before, start_step, teacher_outputs) -> dict:
    """What ``foldgpt.json`` of a healed folder records."""
    params = trainable_parameters(model)
    lora = sum(p.numel() for name, p in params.items() if "lora_" in name)
    steps_done = history[-1]["step"] if history else 0
    tokens_this_run = (steps_done - start_step) * config.tokens_per_step
    return {
        "foldgpt_version": __version__,
        "stage": "heal",
        "source_model": student.source,
        "teacher": teacher.source,
        "source_metadata": read_metadata(student.source),
        "config": {**asdict(config), "target_modules": list(lora_targets(model, config))},
        "total_steps": config.total_steps,
        "steps_done": steps_done,
        "tokens_seen": steps_done * config.tokens_per_step,
        "trainable_parameters": {"lora": lora, "norms": sum(p.numel() for p in params.values()) - lora},
        "teacher_outputs": "cache" if config.teacher_cache else "on the fly",
        "teacher_cache_windows_read": teacher_outputs.hits,
        "teacher_windows_computed": teacher_outputs.computed,
        "train_seconds": seconds_before + seconds,
        "tokens_per_second": tokens_this_run / seconds if seconds > 0 else None,
        "resumed_from_step": start_step or None,
        "history": history,
        "evals": evals,
    }


def save_healed(loaded: LoadedModel, out: Path, metadata: dict, overwrite: bool = False, plain: bool = False) -> LoadedModel:
    """Write a healed compact folder (and, with ``plain``, ``out/plain``); returns the model loaded back from it.

    Layout: ``adapter/`` from ``peft_model.save_pretrained``, then the base model with LoRA removed (``unload``, not
    merged: the shared base stays shared) and the trained norms through ``save_compact``.
    """
    from foldgpt.models.compact import ADAPTER_DIR, save_compact  # noqa: PLC0415
    from foldgpt.models.loading import load_model  # noqa: PLC0415

    model = loaded.model
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with atomic_output_dir(out, overwrite) as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks for transformers' deprecated is_gradient_checkpointing
        model.save_pretrained(str(folder / ADAPTER_DIR))
        base = model.unload()
        base.requires_grad_(False)
        save_compact(base, loaded.tokenizer, folder, metadata)
        if plain:
            from foldgpt.folding import export_plain  # noqa: PLC0415

            export_plain(load_model(str(folder), dtype=_dtype_name(dtype), device=str(device)), folder / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load_model(str(out), dtype=_dtype_name(dtype), device=str(device))


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")

