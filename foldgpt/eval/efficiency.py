"""Efficiency figures of a loaded model, measured on its own device (CPU or GPU).

- parameters: ``total`` counts every block position's weights as a plain export materialises them (a folded model's
  shared tensors once per position that uses them); ``unique`` counts each distinct tensor once (what a compact folder
  stores). LoRA adapters of a healed model count in both.
- disk: bytes of the weight files of the model's folder (safetensors, compact weights, adapter; not the tokenizer).
- FLOPs per token: ``foldgpt.budget.model_flops_per_token`` (2 per multiply-accumulate of every linear layer, LoRA
  included, plus attention at the given context; embeddings are lookups).
- prefill: one forward pass over ``1 x prefill_tokens`` tokens (no cache); latency is its median time over
  ``repeats`` runs after one warm-up, throughput ``prefill_tokens / latency``.
- decode: after a prefill of the same prompt, ``decode_tokens`` greedy steps of one token each with the KV cache;
  latency per token is the median step time, throughput ``decode_tokens / (sum of step times)`` (median over repeats).
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (weights, activations and cache) after a reset; on CPU the
  process's peak resident set (``VmHWM`` in ``/proc/self/status``) during the measurement, after resetting it through
  ``/proc/self/clear_refs``, so it includes the weights and everything else the process holds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from foldgpt.core.system import peak_rss_bytes
from foldgpt.errors import FoldGPTError
from foldgpt.formats.plain import folder_weight_bytes
from foldgpt.surgery.budget import model_flops_per_token
from foldgpt.surgery.sharing import parameter_report


@dataclass
class EfficiencyReport:
    """Size, cost and speed of one model on one device."""

    device: str
    dtype: str
    threads: int
    parameters_total: int
    parameters_unique: int
    disk_bytes: int | None
    flops_per_token: int
    flops_context: int
    prefill_tokens: int
    prefill_latency_s: float
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_latency_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int | None
    peak_memory_kind: str
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def base_model(model: torch.nn.Module) -> Any:
    """The transformers model inside a peft ``PeftModel`` (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total as materialised per position, unique) parameters of a plain, folded or healed model."""
    inner = base_model(model)
    try:

        report = parameter_report(inner)
        return report.materialised, report.unique
    except (ImportError, FoldGPTError):  # an architecture without block adapters: plain counts
        unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        return unique, unique


def disk_bytes(source: str | Path | None) -> int | None:
    """Weight bytes of a model folder (or the size of a .gguf file); None when there is nothing on disk."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None

    return folder_weight_bytes(path)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_step_seconds(model: torch.nn.Module, ids: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    """Greedy decoding with the KV cache: the time of each of ``steps`` one-token forward passes."""
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _synchronize(device)
        times.append(time.perf_counter() - start)
        cache = out.past_key_values
    return times


def measure_efficiency(
    model: torch.nn.Module,
    source: str | Path | None = None,
    prefill_tokens: int = 256,
    decode_tokens: int = 32,
    repeats: int = 2,
    flops_context: int = 2048,
    seed: int = 0,
) -> EfficiencyReport:
    """Measure ``model`` (a plain HF model, or a folded / healed one) on the device its weights are on.

    ``source``: the model's folder (or .gguf file) for the disk size. Inputs are seeded random token ids, batch 1.
    """
    if prefill_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise FoldGPTError("prefill tokens, decode tokens and repeats must all be at least 1")
    inner = base_model(model)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    limit = getattr(inner.config, "max_position_embeddings", None)
    if limit is not None and prefill_tokens + decode_tokens + 1 > limit:
        raise FoldGPTError(f"prefill {prefill_tokens} + decode {decode_tokens} tokens exceed the model's {limit} positions; use fewer")
    total, unique = parameter_counts(model)

    flops = model_flops_per_token(inner, flops_context)
    vocab = inner.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, prefill_tokens), generator=generator).to(device)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        kind = "cuda_max_memory_allocated"
    else:
        kind = "cpu_peak_rss_vmhwm" if _cpu_peak_reset() else "cpu_peak_rss_since_start"
    prefill_seconds(model, ids[:, : min(16, prefill_tokens)], device)  # warm-up
    prefill_times = [prefill_seconds(model, ids, device) for _ in range(repeats)]
    decode_runs = [decode_step_seconds(model, ids, decode_tokens, device) for _ in range(repeats)]
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else (peak_rss_bytes() or None)

    prefill_latency = statistics.median(prefill_times)
    decode_total = statistics.median(sum(run) for run in decode_runs)
    decode_latency = statistics.median(t for run in decode_runs for t in run)
    return EfficiencyReport(
        device=str(device), dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
        parameters_total=total, parameters_unique=unique, disk_bytes=disk_bytes(source),
        flops_per_token=flops, flops_context=flops_context,
        prefill_tokens=prefill_tokens, prefill_latency_s=prefill_latency, prefill_tokens_per_s=prefill_tokens / prefill_latency,
        decode_tokens=sum(len(run) for run in decode_runs) // repeats, decode_latency_s=decode_latency,
        decode_tokens_per_s=decode_tokens / decode_total, peak_memory_bytes=peak, peak_memory_kind=kind, repeats=repeats,
    )


def format_report(report: EfficiencyReport) -> str:
    """The report as a few readable lines."""
    disk = "n/a" if report.disk_bytes is None else f"{report.disk_bytes / 2**20:.1f} MiB"
    peak = "n/a" if report.peak_memory_bytes is None else f"{report.peak_memory_bytes / 2**20:.0f} MiB ({report.peak_memory_kind})"
    return "\n".join([
        f"efficiency on {report.device} ({report.dtype}, {report.threads} threads):",
        f"  parameters {report.parameters_total:,} total, {report.parameters_unique:,} unique; weights on disk {disk}",
        f"  FLOPs per token {report.flops_per_token / 1e6:,.1f} M (context {report.flops_context})",
        f"  prefill 1x{report.prefill_tokens}: {report.prefill_latency_s * 1000:.1f} ms, {report.prefill_tokens_per_s:,.0f} tokens/s",
        f"  decode {report.decode_tokens} tokens (KV cache): {report.decode_latency_s * 1000:.1f} ms/token, "
        f"{report.decode_tokens_per_s:,.1f} tokens/s",
        f"  peak memory {peak}",
    ])
