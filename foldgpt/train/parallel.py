"""Data-parallel training through accelerate: one process per device, launched by ``accelerate launch`` or ``torchrun``.

A single process (no launcher, ``WORLD_SIZE`` unset or 1) never touches accelerate, so its results stay exactly what
they were. Under a launcher with ``W`` processes, ``DataParallel`` wraps an ``accelerate.Accelerator`` (DDP, or FSDP
when the accelerate config asks for it; gloo on CPUs, NCCL on GPUs): each rank trains on its own share of every
step's windows, gradients are averaged over the ranks in the backward pass, and only rank 0 writes files.

Global batch: a step sees ``micro_batch * grad_accum * W`` windows; rank ``r`` takes micro-batches
``r * grad_accum .. (r + 1) * grad_accum - 1`` of the step (see ``WindowSchedule.indices``). Averaging over ranks
then gives the gradient of one process with ``grad_accum * W`` micro-batches, so ``W`` processes and one process with
the same global batch train to the same weights, up to the order of float additions (the all-reduce sums in another
order than local accumulation): equal to about 1e-6 relative in float32, not bitwise.

Gate training (``foldgpt.importance.gates.train_gates``) splits its steps the same way but wraps nothing: the model's
weights are frozen and the only trainable tensor is the gates, whose gradient is averaged with one all-reduce per
step (``DataParallel.mean_``).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from foldgpt.arch.adapters import adapter_for
from foldgpt.errors import FoldGPTError


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True unless a launcher started this process with a rank other than 0 (only rank 0 writes outputs)."""
    return os.environ.get("RANK", "0") == "0"


class DataParallel:
    """The accelerate side of a data-parallel run: rank, device, gradient sync, collectives, the writing rank."""

    def __init__(self) -> None:
        from accelerate import Accelerator  # noqa: PLC0415

        # accelerate only picks gloo on CPU-only machines when told to use the CPU
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.fsdp = self.accelerator.distributed_type.name == "FSDP"
        if self.world < 2:
            raise FoldGPTError(
                f"WORLD_SIZE is {launched_world_size()} but accelerate set up {self.world} process(es); launch with "
                "'accelerate launch' or 'torchrun' (on a CPU-only machine: torchrun --nproc_per_node N)"
            )

    @classmethod
    def from_environment(cls) -> DataParallel | None:
        """A ``DataParallel`` when started by a launcher with more than one process, else None."""
        return cls() if launched_world_size() > 1 else None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the model (DDP / FSDP) and the optimiser; parameters are broadcast from rank 0."""
        return self.accelerator.prepare(model, optimizer)

    def prepare_frozen(self, model: Any) -> Any:
        """The teacher: under FSDP sharded like the student (FSDP2 ``fully_shard`` on each block, then the root; each
        block is moved to the GPU and sharded in turn), a plain replica on each rank's device otherwise."""
        if not self.fsdp:
            return model.to(self.device)
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415


        for layer in adapter_for(model).layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model

    def no_sync(self, model: nn.Module, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return nullcontext() if sync else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Clip the averaged gradients; under FSDP those of the wrapped model (its Parameters replaced the originals)."""
        if self.fsdp:
            parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Every rank's scalars averaged over the ranks (one all-reduce)."""
        names = sorted(values)
        tensor = torch.tensor([values[name] for name in names], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return {name: value / self.world for name, value in zip(names, tensor.tolist())}

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged over the ranks, in place (one all-reduce; every rank ends with the same values): the
        gradient of a small Parameter trained outside DDP, such as the gates of ``train_gates``."""
        torch.distributed.all_reduce(tensor)
        return tensor.div_(self.world)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a Ctrl-C seen by one process stops them all at the same step)."""
        tensor = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def gather_object(self, value: object) -> list:
        gathered: list = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def full_state(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors in full, on the CPU (gathered from the shards under FSDP; every rank must call this)."""
        if self.fsdp:
            state = self.accelerator.get_state_dict(model)
            return {name: state[name].detach().cpu().clone() for name in names if name in state}
        parameters = dict(self.unwrap(model).named_parameters())
        return {name: parameters[name].detach().cpu().clone() for name in names}

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------- one process, many GPUs





