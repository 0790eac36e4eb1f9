"""``foldgpt report``: models side by side in ``report.md`` / ``report.json``, with the figures people look at.

Inputs are ``foldgpt compress`` output folders (each gives its dense model and its compressed model) and JSON files
written by ``foldgpt eval --out`` (one model each). The first row whose label says dense is the reference for the
retention columns: accuracy retained = model accuracy / dense accuracy, and perplexity ratio = model / dense.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foldgpt.core.outputs import atomic_output_dir
from foldgpt.errors import FoldGPTError


@dataclass
class ModelRow:
    """One model's numbers, as read from a compress run or an eval JSON."""

    label: str
    parameters: int | None = None
    materialised_parameters: int | None = None
    perplexity: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    efficiency: dict[str, Any] = field(default_factory=dict)
    dense: bool = False

    @property
    def average_accuracy(self) -> float | None:
        values = [metrics["acc"] for metrics in self.accuracy.values() if metrics.get("acc") is not None]
        return sum(values) / len(values) if values else None


def rows_from_eval(results: dict, label: str, parameters: int | None = None, materialised: int | None = None,
                   dense: bool = False) -> ModelRow:
    """A row from an evaluation result (``eval.json`` of a compress stage, or ``foldgpt eval --out``)."""
    perplexity = {name: value["perplexity"] if isinstance(value, dict) else value for name, value in results.get("perplexity", {}).items()}
    tasks = results.get("tasks") or {}
    tasks = tasks.get("metrics", tasks) if isinstance(tasks, dict) else {}
    accuracy = {task: {m: v for m, v in metrics.items() if m in ("acc", "acc_norm") and v is not None} for task, metrics in tasks.items()}
    efficiency = results.get("efficiency") or {}
    if parameters is None:
        parameters = efficiency.get("parameters_unique")
        materialised = efficiency.get("parameters_total", materialised)
    return ModelRow(label=label, parameters=parameters, materialised_parameters=materialised, perplexity=perplexity,
                    accuracy=accuracy, efficiency=efficiency, dense=dense)


def read_rows(source: Path) -> list[ModelRow]:
    """The rows one input contributes: two for a compress folder (dense, compressed), one for an eval JSON."""
    source = Path(source)
    if source.is_dir():
        summary_path = source / "summary.json"
        if not summary_path.is_file():
            raise FoldGPTError(f"'{source}' has no summary.json; give a folder written by foldgpt compress or a JSON from foldgpt eval --out")
        summary = json.loads(summary_path.read_text())
        params = summary["parameters"]
        return [
            rows_from_eval(summary["dense"], f"{Path(summary['model']).name} (dense)", params["dense"], params["dense"], dense=True),
            rows_from_eval(summary["compressed"], source.name, params["unique"], params["materialised"]),
        ]
    if source.is_file():
        try:
            results = json.loads(source.read_text())
        except json.JSONDecodeError as error:
            raise FoldGPTError(f"'{source}' is not valid JSON ({error.msg}); give a JSON written by foldgpt eval --out") from error
        return [rows_from_eval(results, source.stem, dense="dense" in source.stem)]
    raise FoldGPTError(f"report input '{source}' does not exist; give compress output folders or eval JSON files")


def collect_rows(sources: list[Path]) -> list[ModelRow]:
    """Rows of every input, with identical dense rows (several runs of one model) kept once."""
    rows: list[ModelRow] = []
    for source in sources:
        for row in read_rows(source):
            if row.dense and any(other.dense and asdict(other) == asdict(row) for other in rows):
                continue
            rows.append(row)
    return rows


def report_table(rows: list[ModelRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the side-by-side table (strings, ready for Markdown)."""
    reference = next((row for row in rows if row.dense), None)
    ppl_sets = list(dict.fromkeys(name for row in rows for name in row.perplexity))
    tasks = list(dict.fromkeys(task for row in rows for task in row.accuracy))
    header = ["model", "parameters", "% of dense"] + [f"{name} ppl" for name in ppl_sets]
    header += [f"{task} acc / acc_norm" for task in tasks]
    if tasks:
        header += ["avg acc", "acc retained"]
    header += ["prefill tok/s", "decode tok/s"]
    cells = []
    for row in rows:
        line = [row.label, _millions(row.parameters), _percent(row.parameters, reference.parameters if reference else None)]
        line += [_number(row.perplexity.get(name)) for name in ppl_sets]
        line += [_accuracy(row.accuracy.get(task, {})) for task in tasks]
        if tasks:
            line += [_number(row.average_accuracy, 4),
                     _percent(row.average_accuracy, reference.average_accuracy if reference else None)]
        line += [_number(row.efficiency.get("prefill_tokens_per_s"), 0), _number(row.efficiency.get("decode_tokens_per_s"), 1)]
        cells.append(line)
    return header, cells


def write_report(sources: list[str | Path], out: str | Path, overwrite: bool = True) -> Path:
    """Write ``out/report.md``, ``out/report.json`` and the figures for the given inputs; return ``out``."""
    paths = [Path(source) for source in sources]
    rows = collect_rows(paths)
    header, cells = report_table(rows)
    markdown = ["# foldgpt report", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(line) + " |" for line in cells]
    markdown += ["", "Parameters are unique parameters (a shared tensor counts once). Retention is relative to the dense row.", ""]
    with atomic_output_dir(Path(out), overwrite=overwrite) as folder:
        figures = _copy_run_figures(paths, folder)
        if any(row.parameters and row.perplexity for row in rows):
            plot_perplexity_against_parameters(rows, folder / "perplexity_vs_parameters.png")
            figures.append("perplexity_vs_parameters.png")
        markdown += [f"![{name}]({name})" for name in figures]
        (folder / "report.md").write_text("\n".join(markdown) + "\n")
        (folder / "report.json").write_text(json.dumps({"sources": [str(s) for s in paths], "header": header, "rows": [asdict(r) for r in rows]},
                                                       indent=2) + "\n")
    return Path(out)


def plot_perplexity_against_parameters(rows: list[ModelRow], path: Path) -> None:
    """One marker per model and evaluation set: perplexity (log scale) against unique parameters."""
    import matplotlib  # noqa: PLC0415  (plotting is optional work; keep import time low)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(n for row in rows for n in row.perplexity):
        points = [(row.parameters / 1e6, row.perplexity[name], row.label) for row in rows if row.parameters and name in row.perplexity]
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=name)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("unique parameters (M)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _copy_run_figures(sources: list[Path], folder: Path) -> list[str]:
    """The similarity heatmap and gate trajectory of each compress run, copied next to the report."""
    copied = []
    for source in sources:
        for stage, name in (("analysis", "similarity_heatmap.png"), ("pruned", "gates.png")):
            figure = source / stage / name
            if source.is_dir() and figure.is_file():
                target = f"{source.name}-{name}"
                shutil.copyfile(figure, folder / target)
                copied.append(target)
    return copied


def _millions(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}M"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{100 * value / reference:.1f}%"


def _accuracy(metrics: dict[str, float]) -> str:
    if not metrics:
        return "-"
    return " / ".join(f"{metrics[m]:.4f}" for m in ("acc", "acc_norm") if m in metrics)
