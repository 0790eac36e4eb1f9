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

import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from foldgpt._version import __version__
from foldgpt.core.outputs import read_metadata
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.config import HealConfig
from foldgpt.healing.lora import lora_targets
from foldgpt.healing.run import HealingRun, checked_paths, prepare_run
from foldgpt.healing.save import rebuilt_on_cpu, save_healed
from foldgpt.healing.state import TrainingState, initial_state, write_checkpoint
from foldgpt.healing.steps import check_finite, evaluate, loss_terms, train_step, weighted_loss
from foldgpt.train.interrupts import deferred_interrupt
from foldgpt.train.lora import trainable_parameters
from foldgpt.train.modes import activation_checkpointing, healing_mode

# the step's pieces (now in healing/steps.py) stay importable from here, where they were defined before
__all__ = ["HealResult", "check_finite", "evaluate", "finish", "heal", "heal_metadata", "loss_terms", "run_loop",
           "train_step", "weighted_loss"]


@dataclass
class HealResult:
    """The healed student (a peft model; reloaded from ``out`` when one was written), and what happened."""

    loaded: LoadedModel
    metadata: dict
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    completed: bool = True


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
    config = config or HealConfig()
    out, checkpoint_path = checked_paths(student, out, overwrite, checkpoint_dir, resume)
    run = prepare_run(student, teacher, config, checkpoint_path, resume)
    state = initial_state(run, resume)
    train_seconds = run_loop(run, state, stop_after_steps)
    return finish(run, state, train_seconds, out, overwrite, plain)


def run_loop(run: HealingRun, state: TrainingState, stop_after_steps: int | None = None) -> float:
    """Train from the step after ``state.step`` to the last (or for ``stop_after_steps`` steps), recording each step
    and the ``eval_every`` evaluations in ``state``; checkpoints every ``checkpoint_every`` steps, on early stops and
    on Ctrl-C / SIGTERM (after the step in progress; then ``KeyboardInterrupt``). Returns the seconds it trained."""
    config, total = run.config, run.config.total_steps
    run_start = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(healing_mode(run.training_model))  # base dropout off, LoRA dropout as configured
        stack.enter_context(activation_checkpointing(run.model.get_base_model(), config.gradient_checkpointing))
        interrupt = stack.enter_context(deferred_interrupt())
        progress = stack.enter_context(tqdm(total=total, initial=state.start_step, desc="heal", leave=False,
                                            dynamic_ncols=True, disable=None if run.is_main else True))
        for step in range(state.start_step + 1, total + 1):
            state.step = step
            step_start = time.perf_counter()
            record = train_step(run.training_model, run.params, run.optimizer, run.teacher_outputs, run.train_windows,
                                run.schedule, step, config, run.device, run.parallel)
            record["seconds"] = time.perf_counter() - step_start
            state.history.append(record)
            rate = (step - state.start_step) * config.tokens_per_step / max(time.perf_counter() - run_start, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:.0f}")
            if config.eval_every and step % config.eval_every == 0 and step != total:
                state.evals.append({"step": step, **evaluate(run.training_model, run.teacher_outputs, run.eval_windows, config)})
            stop_now = stop_after_steps is not None and step - state.start_step >= stop_after_steps and step != total
            interrupted = run.parallel.any(interrupt["interrupted"]) if run.parallel else interrupt["interrupted"]
            if interrupted or stop_now or (config.checkpoint_every and step % config.checkpoint_every == 0):
                write_checkpoint(run, state, step, state.seconds_before + time.perf_counter() - run_start)
            if interrupted:
                _report_interrupt(run, step)
                raise KeyboardInterrupt
            if stop_now:
                state.completed = False
                break
    run.training_model.eval()
    return time.perf_counter() - run_start


def _report_interrupt(run: HealingRun, step: int) -> None:
    where = f"; checkpoint in {run.checkpoint_dir}, re-run with --resume to continue" if run.checkpoint_dir else ""
    if run.is_main:
        print(f"foldgpt: healing interrupted after step {step}/{run.config.total_steps}{where}", file=sys.stderr)


def finish(run: HealingRun, state: TrainingState, train_seconds: float, out: Path | None, overwrite: bool = False,
           plain: bool = False) -> HealResult:
    """After the loop: a completed run is scored on the held-out windows once more and saved to ``out`` (its
    checkpoint then removed); an early-stopped one only reports (its checkpoint resumes it)."""
    if state.completed:
        state.evals.append({"step": state.step, **evaluate(run.training_model, run.teacher_outputs, run.eval_windows, run.config)})
    metadata = heal_metadata(run, state, train_seconds)
    result = HealResult(loaded=LoadedModel(model=run.model, tokenizer=run.student.tokenizer, source=run.student.source),
                        metadata=metadata, history=state.history, evals=state.evals, completed=state.completed)
    if state.completed and out is not None:
        result.loaded = _save(run, result.loaded, metadata, out, overwrite, plain)
    checkpoint_dir = run.checkpoint_dir
    if state.completed and run.is_main and checkpoint_dir is not None and out is not None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result


def _save(run: HealingRun, loaded: LoadedModel, metadata: dict, out: Path, overwrite: bool, plain: bool) -> LoadedModel:
    """``save_healed``; data-parallel: rank 0 writes (under FSDP from the gathered tensors, on a CPU copy), the
    others wait and keep their model."""
    parallel = run.parallel
    if parallel is None:
        return save_healed(loaded, out, metadata, overwrite=overwrite, plain=plain)
    gathered = parallel.full_state(run.training_model, list(run.params)) if parallel.fsdp else None
    if run.is_main:
        writer = loaded if gathered is None else rebuilt_on_cpu(run.student, run.config, gathered, run.base_dtype)
        loaded = save_healed(writer, out, metadata, overwrite=overwrite, plain=plain)
    parallel.barrier()
    return loaded


def heal_metadata(run: HealingRun, state: TrainingState, seconds: float) -> dict:
    """What ``foldgpt.json`` of a healed folder records (``seconds``: the training time of this call)."""
    config, params = run.config, trainable_parameters(run.model)  # counted on the peft model, not the wrapper's shards
    lora = sum(p.numel() for name, p in params.items() if "lora_" in name)
    steps_done = state.history[-1]["step"] if state.history else 0
    tokens_this_run = (steps_done - state.start_step) * config.tokens_per_step
    return {
        "foldgpt_version": __version__,
        "stage": "heal",
        "source_model": run.student.source,
        "teacher": run.teacher.source,
        "teacher_hub": run.teacher.hub,
        "source_metadata": read_metadata(run.student.source),
        "config": {**asdict(config), "target_modules": list(lora_targets(run.model, config))},
        "total_steps": config.total_steps,
        "steps_done": steps_done,
        "tokens_seen": steps_done * config.tokens_per_step,
        "trainable_parameters": {"lora": lora, "norms": sum(p.numel() for p in params.values()) - lora},
        "teacher_outputs": "cache" if config.teacher_cache else "on the fly",
        "teacher_cache_windows_read": run.teacher_outputs.hits,
        "teacher_windows_computed": run.teacher_outputs.computed,
        "train_seconds": state.seconds_before + seconds,
        "tokens_per_second": tokens_this_run / seconds if seconds > 0 else None,
        "resumed_from_step": state.start_step or None,
        "history": state.history,
        "evals": state.evals,
    }
