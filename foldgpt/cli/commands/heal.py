"""``foldgpt heal``: LoRA distillation healing of a pruned or folded student from the dense teacher."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import HealSettings
from foldgpt.core.outputs import check_output_free
from foldgpt.errors import FoldGPTError
from foldgpt.formats.placement import load_placed
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.train.parallel import is_main_process, launched_world_size


def heal_config(args: argparse.Namespace) -> HealConfig:
    """The ``HealConfig`` of a parsed ``heal`` command line (the defaults, with what was given)."""
    return with_steps(read_config(args, HealSettings()).heal)


def with_steps(config: HealConfig) -> HealConfig:
    """``config``, refused if it heals no step (``--steps 0`` only means "skip healing" to compress)."""
    if config.total_steps == 0:
        raise FoldGPTError("heal needs --steps >= 1 (or --tokens N)")
    return config


def run(args: argparse.Namespace) -> None:
    settings: HealSettings = read_config(args, HealSettings())
    config = with_steps(settings.heal)
    check_output_free(Path(args.out), args.overwrite)
    device, main_process, loading = settings.loading.device, True, settings.loading
    if launched_world_size() > 1:  # accelerate launch / torchrun: read on the CPU, heal moves (DDP) or shards (FSDP)
        device = "cpu"  # the models to each process's own device; rank 0 reports
        main_process = is_main_process()
        config = dataclasses.replace(config, world_size=launched_world_size())  # the global batch, for the message
    student = load_placed(args.student, dtype=loading.dtype, device=device, device_map=loading.device_map,
                          trust_remote_code=loading.trust_remote_code)
    teacher = load_placed(args.teacher, dtype=loading.dtype, device=device, device_map=loading.device_map,
                          trust_remote_code=loading.trust_remote_code)
    if main_process:
        print(f"healing {student.source} from {teacher.source}: {config.total_steps} steps x {config.tokens_per_step} tokens",
              file=sys.stderr)
    result = heal(student, teacher, config, out=args.out, overwrite=args.overwrite, plain=args.plain,
                  checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    if not main_process:
        return
    meta, first, last = result.metadata, result.evals[0], result.evals[-1]
    print(f"healed {meta['steps_done']} steps, {meta['tokens_seen']:,} tokens in {meta['train_seconds']:.0f}s "
          f"({meta['tokens_per_second'] or 0:.0f} tokens/s); trainable: {meta['trainable_parameters']['lora']:,} LoRA + "
          f"{meta['trainable_parameters']['norms']:,} norm parameters")
    if "kl" in first:
        print(f"held-out: KL {first['kl']:.4f} -> {last['kl']:.4f}, tail {first['tail']:.4f} -> {last['tail']:.4f}, "
              f"perplexity {first['ppl']:.2f} -> {last['ppl']:.2f}")
    print(f"wrote {args.out}" + (f" and {args.out}/plain" if args.plain else ""))
