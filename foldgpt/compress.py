"""The main job, top to bottom: dense perplexity -> analysis -> block removal -> pruned perplexity -> summary.

Later stages of FoldGPT (gated removal, sharing, healing) plug in here as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from foldgpt.analysis import analyze, write_analysis
from foldgpt.artifacts import atomic_output_dir, check_output_free, save_plain_model, write_json_atomic
from foldgpt.data import CalibrationConfig
from foldgpt.evaluation import perplexity
from foldgpt.models import load_model
from foldgpt.pruning import prune
from foldgpt.removal import count_parameters


@dataclass
class EvalConfig:
    """Which perplexities to report and on how much text."""

    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb"])
    seqlen: int = 1024
    max_tokens: int | None = 16384
    batch_size: int = 1


def compress(
    model: str,
    out: str | Path,
    method: str = "bi",
    remove: int | None = None,
    remove_ratio: float | None = None,
    calibration: CalibrationConfig | None = None,
    evaluation: EvalConfig | None = None,
    overwrite: bool = False,
    target_params: float | None = None,
    target_flops: float | None = None,
) -> dict:
    """Run every stage; write ``out/analysis``, ``out/pruned`` and ``out/summary.json``; return the summary.

    Targets as in ``foldgpt.prune``; with none given, 6 blocks are removed.
    """
    if remove is None and remove_ratio is None and target_params is None and target_flops is None:
        remove = 6
    calibration = calibration or CalibrationConfig()
    evaluation = evaluation or EvalConfig()
    check_output_free(Path(out), overwrite)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    loaded = load_model(model)
    timings["load"] = time.perf_counter() - clock

    def score(label: str) -> dict[str, float]:
        start = time.perf_counter()
        values = {
            name: perplexity(loaded.model, loaded.tokenizer, name, evaluation.seqlen, evaluation.max_tokens, evaluation.batch_size).perplexity
            for name in evaluation.datasets
        }
        timings[f"perplexity_{label}"] = time.perf_counter() - start
        return values

    dense_ppl = score("dense")
    dense_parameters = count_parameters(loaded.model)
    clock = time.perf_counter()
    stats = analyze(loaded, calibration)
    timings["analysis"] = time.perf_counter() - clock
    clock = time.perf_counter()
    result = prune(loaded, method, remove, remove_ratio, calibration, target_params=target_params, target_flops=target_flops)
    timings["prune"] = time.perf_counter() - clock
    pruned_ppl = score("pruned")
    summary = {
        "model": loaded.source,
        "method": method,
        "removed": result.metadata["removed"],
        "num_blocks": [result.metadata["num_blocks_before"], result.metadata["num_blocks_after"]],
        "parameters": {"dense": dense_parameters, "pruned": count_parameters(loaded.model)},
        "perplexity": {"dense": dense_ppl, "pruned": pruned_ppl},
        "evaluation": vars(evaluation),
        "calibration": vars(calibration),
        "seconds": timings,
    }
    with atomic_output_dir(Path(out), overwrite) as folder:
        (folder / "analysis").mkdir()
        write_analysis(stats, folder / "analysis")
        save_plain_model(loaded.model, loaded.tokenizer, folder / "pruned", result.metadata)
        write_json_atomic(folder / "summary.json", summary)
    print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    """The on-screen table of the main job."""
    datasets = list(summary["perplexity"]["dense"])
    header = f"{'model':<10}{'blocks':>8}{'params':>14}" + "".join(f"{name + ' ppl':>16}" for name in datasets)
    rows = [header, "-" * len(header)]
    for label, blocks in (("dense", summary["num_blocks"][0]), ("pruned", summary["num_blocks"][1])):
        values = "".join(f"{summary['perplexity'][label][name]:>16.2f}" for name in datasets)
        rows.append(f"{label:<10}{blocks:>8}{summary['parameters'][label]:>14,}{values}")
    rows.append(f"method {summary['method']}: removed blocks {summary['removed']}")
    rows.append("seconds: " + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in summary["seconds"].items()))
    return "\n".join(rows)
