"""A healing run's progress (step, history, evaluations, time) and its checkpoint: written so that a resumed run
reaches the weights of an uninterrupted one (trainable tensors, optimiser and RNG state, per rank)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from foldgpt.errors import FoldGPTError
from foldgpt.healing.run import HealingRun
from foldgpt.healing.steps import evaluate
from foldgpt.train.checkpoints import load_checkpoint, save_checkpoint


@dataclass
class TrainingState:
    """Where a run stands: the step it started after and the last one done, each step's record, the evaluations,
    the training seconds of earlier calls (resumed runs), and whether it ran to the end."""

    start_step: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds_before: float = 0.0
    completed: bool = True


def initial_state(run: HealingRun, resume: bool) -> TrainingState:
    """The state of the checkpoint (``resume``; the tensors, optimiser and RNG restored), or a fresh one: the RNG
    seeded and the held-out windows scored before the first step."""
    if resume:
        assert run.checkpoint_dir is not None  # checked_paths refuses --resume without a checkpoint folder
        state = restore_checkpoint(load_checkpoint(run.checkpoint_dir, run.identity), run.params, run.optimizer, run.rank)
        if run.is_main:
            print(f"foldgpt: resuming from step {state.start_step}/{run.config.total_steps} ({run.checkpoint_dir})",
                  file=sys.stderr)
        return state
    torch.manual_seed(run.config.seed + run.rank)  # rank 0 (and a single process) as before; other ranks their own LoRA dropout
    state = TrainingState()
    state.evals.append({"step": 0, **evaluate(run.training_model, run.teacher_outputs, run.eval_windows, run.config)})
    return state


def write_checkpoint(run: HealingRun, state: TrainingState, step: int, seconds: float) -> None:
    """Write the checkpoint after ``step`` (rank 0 writes; under FSDP from the gathered tensors, without optimiser
    state); every process takes part and waits for it. Nothing without a checkpoint folder."""
    if run.checkpoint_dir is None:
        return
    parallel = run.parallel
    if parallel is not None and parallel.fsdp:
        trainable = parallel.full_state(run.training_model, list(run.params))
    else:
        trainable = {name: p.detach().clone() for name, p in run.params.items()}
    rng_ranks = parallel.gather_object(torch.get_rng_state()) if parallel else None
    if run.is_main:  # only rank 0 writes; the others wait for it
        payload = {
            "identity": run.identity, "step": step, "seconds": seconds, "trainable": trainable,
            "optimizer": None if parallel is not None and parallel.fsdp else run.optimizer.state_dict(),
            "rng": torch.get_rng_state(), "history": state.history, "evals": state.evals,
        }
        if rng_ranks is not None:
            payload["rng_ranks"] = rng_ranks
        save_checkpoint(run.checkpoint_dir, payload)
    if parallel is not None:
        parallel.barrier()


def restore_checkpoint(payload: dict, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                       rank: int = 0) -> TrainingState:
    """Load a checkpoint's trainable tensors, optimiser and RNG state (data-parallel: this rank's); returns its state."""
    stored = payload["trainable"]
    if set(stored) != set(params):
        raise FoldGPTError("--resume: the checkpoint's trainable tensors do not match this model; start without --resume")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(stored[name])
    optimizer.load_state_dict(payload["optimizer"])
    rng_ranks = payload.get("rng_ranks")
    torch.set_rng_state(rng_ranks[rank] if rng_ranks else payload["rng"])
    step = payload["step"]
    return TrainingState(start_step=step, step=step, history=list(payload["history"]), evals=list(payload["evals"]),
                         seconds_before=float(payload["seconds"]))
