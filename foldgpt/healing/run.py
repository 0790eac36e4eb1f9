"""Setting a healing run up: the checks that refuse it before any work, then the parts it holds from the first step
to the save (processes and devices, data, the teacher's outputs, LoRA and the optimiser)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from foldgpt.arch.adapters import adapter_for
from foldgpt.core.outputs import check_output_free, read_metadata
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.config import HealConfig
from foldgpt.healing.data import WindowSchedule, healing_windows
from foldgpt.healing.lora import add_lora
from foldgpt.healing.teacher import Teacher
from foldgpt.surgery.sublayers import refuse_removed_sublayers
from foldgpt.surgery.ties import tie_record
from foldgpt.train.lora import trainable_parameters
from foldgpt.train.parallel import DataParallel


@dataclass
class HealingRun:
    """What a healing run holds fixed from its first step to the save."""

    student: LoadedModel
    teacher: LoadedModel  # under a launcher: the replica (or the FSDP shards) on this process's device
    config: HealConfig  # world_size set from the launcher
    parallel: DataParallel | None
    device: torch.device
    base_dtype: torch.dtype  # the student's dtype as loaded (FSDP saves rebuild it on the CPU in that dtype)
    model: nn.Module  # the peft model
    training_model: nn.Module  # ``model``, or under a launcher the DDP / FSDP wrapper around it
    params: dict[str, nn.Parameter]  # the trainable tensors: LoRA and the norms
    optimizer: torch.optim.Optimizer
    train_windows: torch.Tensor
    eval_windows: torch.Tensor
    schedule: WindowSchedule
    teacher_outputs: Teacher
    identity: dict  # what a checkpoint must match to be resumed
    checkpoint_dir: Path | None

    @property
    def rank(self) -> int:
        return self.parallel.rank if self.parallel else 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, outputs and messages (rank 0, or the only process)."""
        return self.parallel.is_main if self.parallel else True


def checked_paths(student: LoadedModel, out: str | Path | None, overwrite: bool, checkpoint_dir: str | Path | None,
                  resume: bool) -> tuple[Path | None, Path | None]:
    """``out`` and the checkpoint folder (default ``<out>.checkpoint``), refused before any work: a student with
    removed sub-layers, an output folder in the way, ``resume`` with nowhere to resume from."""
    refuse_removed_sublayers(student.model, "healing")
    out = Path(out) if out is not None else None
    if out is not None:
        check_output_free(out, overwrite)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else (Path(f"{out}.checkpoint") if out else None)
    if resume and checkpoint_dir is None:
        raise FoldGPTError("--resume needs a checkpoint folder: give --out (its checkpoint is <out>.checkpoint) or --checkpoint-dir")
    return out, checkpoint_dir


def prepare_run(student: LoadedModel, teacher: LoadedModel, config: HealConfig, checkpoint_dir: Path | None,
                resume: bool) -> HealingRun:
    """Check the models, place them (one replica per process under a launcher), cut the data, open the teacher's
    outputs, and wrap the student with LoRA and its optimiser."""
    _check_models(student, teacher, config)
    parallel = DataParallel.from_environment()
    config = _with_world_size(config, parallel, student, teacher, resume)
    base_dtype = next(student.model.parameters()).dtype
    teacher = _placed(student, teacher, parallel)
    device = parallel.device if parallel else next(student.model.parameters()).device
    train_windows, eval_windows = healing_windows(student.tokenizer, config.data, config.seqlen, config.eval_windows, config.seed)
    teacher_outputs = _teacher_outputs(teacher, config, len(train_windows))
    identity = {"student": student.source, "teacher": teacher.source, "config": config.result_fields()}
    model = add_lora(student.model, config)
    params = trainable_parameters(model)
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    training_model = model
    if parallel is not None:
        training_model, optimizer = parallel.prepare(model, optimizer)
    return HealingRun(
        student=student, teacher=teacher, config=config, parallel=parallel, device=device, base_dtype=base_dtype,
        model=model, training_model=training_model, params=params, optimizer=optimizer, train_windows=train_windows,
        eval_windows=eval_windows, schedule=WindowSchedule(len(train_windows), config.seed), teacher_outputs=teacher_outputs,
        identity=identity, checkpoint_dir=checkpoint_dir,
    )


def _placed(student: LoadedModel, teacher: LoadedModel, parallel: DataParallel | None) -> LoadedModel:
    """Under a launcher, one replica per process on its own device (FSDP moves and shards block by block); returns
    the teacher as the run uses it."""
    if parallel is None:
        return teacher
    if not parallel.fsdp:
        student.model.to(parallel.device)
    return LoadedModel(model=parallel.prepare_frozen(teacher.model), tokenizer=teacher.tokenizer, source=teacher.source)


def _teacher_outputs(teacher: LoadedModel, config: HealConfig, train_windows: int) -> Teacher:
    """The teacher's outputs, on the fly or from the cache folder; the key says what a cache was built for."""
    cache_key = {"teacher": teacher.source, "data": config.data, "seqlen": config.seqlen, "seed": config.seed,
                 "eval_windows": config.eval_windows, "tail_layers": config.tail_layers, "bf16": config.bf16,
                 "windows": train_windows}
    return Teacher(teacher, config, Path(config.teacher_cache) if config.teacher_cache else None, cache_key)


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
    tied = read_metadata(student.source).get("stage") == "fold" and tie_record(student.model) is not None
    if (hasattr(student.model, "peft_config") or hasattr(student.model, "get_base_model")) and not tied:
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
