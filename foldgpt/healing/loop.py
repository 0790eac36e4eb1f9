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

import math
import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from foldgpt._version import __version__
from foldgpt.arch.adapters import adapter_for
from foldgpt.core.outputs import check_output_free, read_metadata
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.config import LOSS_TERMS, HealConfig
from foldgpt.healing.data import WindowSchedule, healing_windows, learning_rate
from foldgpt.healing.lora import add_lora, lora_targets
from foldgpt.healing.save import rebuilt_on_cpu, save_healed
from foldgpt.healing.teacher import Teacher, TeacherOutputs, recording_tail
from foldgpt.surgery.sublayers import refuse_removed_sublayers
from foldgpt.train.checkpoints import load_checkpoint, save_checkpoint
from foldgpt.train.interrupts import deferred_interrupt
from foldgpt.train.lora import trainable_parameters
from foldgpt.train.losses import distillation_loss, next_token_loss, tail_loss
from foldgpt.train.modes import activation_checkpointing, autocast, healing_mode, module_modes, restore_modes
from foldgpt.train.parallel import DataParallel


@dataclass
class HealResult:
    """The healed student (a peft model; reloaded from ``out`` when one was written), and what happened."""

    loaded: LoadedModel
    metadata: dict
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    completed: bool = True


# ----------------------------------------------------------------------------------------------------------- data








# ------------------------------------------------------------------------------------------------- trainable parts
















# ------------------------------------------------------------------------------------------------ teacher, losses














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
            record = train_step(training_model, params, optimizer, teacher_outputs, train_windows, schedule, step, config,
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
                loaded = result.loaded if gathered is None else rebuilt_on_cpu(student, config, gathered, base_dtype)
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
        "teacher_hub": teacher.hub,
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





