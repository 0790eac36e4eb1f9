"""The dense teacher's outputs (logits and tail-layer states), on the fly or from a disk cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from foldgpt.arch.adapters import adapter_for
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.config import HealConfig
from foldgpt.train.modes import autocast

CACHE_MANIFEST = "teacher_cache.json"


@dataclass
class TeacherOutputs:
    """The teacher's logits and the outputs of its last ``k`` blocks (oldest first) for one micro-batch."""

    logits: torch.Tensor
    tail: list[torch.Tensor]


@contextmanager
def recording_tail(model: nn.Module, k: int) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of the last ``k`` blocks of ``model`` (a HF or peft model) into a dict ``{j: hidden}``, ``j``
    counting from the first of them; a dict, so recomputation under activation checkpointing just overwrites."""
    base = unwrapped_model(model)
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


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The HF model inside a peft model, itself possibly inside a DDP / FSDP wrapper (``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = getattr(model, "module")  # noqa: B009 (torch types the attribute as Tensor | Module)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
