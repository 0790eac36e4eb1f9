"""Block-removal methods on one model: perplexity, parameters and scoring time for each method and target.

    python benchmarks/removal_methods.py --remove 6 --max-tokens 16384 --out benchmarks/results/removal_methods.json

Each method scores blocks on the same calibration windows (wikitext2 validation, 8 x 256 tokens by default), its
selected blocks are removed from a fresh copy of the dense model, and WikiText-2 / PTB test perplexity is measured on
the first ``--max-tokens`` tokens in windows of ``--seqlen`` (the full test splits when ``--max-tokens 0``, as a GPU
user should run). Prints a table and writes JSON (and a PNG of perplexity against blocks removed).

Rows already in ``--out`` with the same settings are reused, so methods and targets can be added in later runs.
SLEB is greedy, so its selection for fewer blocks is the prefix of its removal order: it is searched once, for the
largest target.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.loading import load_model
from foldgpt.selection.base import select_blocks_with
from foldgpt.selection.config import PRUNE_SCREEN, GateConfig, ProbeConfig
from foldgpt.selection.gates import select_by_gates_with
from foldgpt.selection.registry import select_blocks
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.workflows.prune import probed_selection


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="bi,angular,sleb,last,random")
    parser.add_argument("--remove", default="6", help="comma-separated numbers of blocks to remove")
    parser.add_argument("--ppl", default="wikitext2,ptb")
    parser.add_argument("--seqlen", type=int, default=1024, help="evaluation window")
    parser.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens per set; 0 = whole test split")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gate-overrides", default="{}",
                        help='GateConfig fields that differ from the defaults, as JSON, e.g. \'{"restarts": 1}\'')
    parser.add_argument("--gate-screen", type=int, default=PRUNE_SCREEN.screen,
                        help="as prune --gate-probe-screen: the gates' near-tied sets screened on held-out WikiText-2 "
                        f"validation, the lowest removed (default: {PRUNE_SCREEN.screen}, prune's; 0 = the gates' own pick)")
    parser.add_argument("--out", default="benchmarks/results/removal_methods.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    dense = load_model(args.model)
    calibration = CalibrationConfig(nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=args.seed)
    windows = load_windows(dense.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    datasets = args.ppl.split(",")
    max_tokens = args.max_tokens or None

    def evaluate(model) -> dict[str, float]:
        return {name: perplexity(model, dense.tokenizer, name, args.seqlen, max_tokens).perplexity for name in datasets}

    out = Path(args.out)
    settings = {"model": dense.source, "calibration": vars(calibration), "eval_seqlen": args.seqlen,
                "eval_max_tokens": max_tokens, "datasets": datasets}
    rows = previous_rows(out, settings)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**settings, "rows": rows}, indent=2) + "\n")

    if not any(r["method"] == "dense" for r in rows):
        rows.insert(0, {"method": "dense", "removed_count": 0, "removed": [], "parameters": count_parameters(dense.model),
                        "perplexity": evaluate(dense.model), "selection_seconds": 0.0})
        save()
    targets = sorted(int(n) for n in args.remove.split(","))
    overrides = json.loads(args.gate_overrides)
    for method in args.methods.split(","):
        greedy_order: list[int] | None = None
        for n_remove in targets:
            if any(r["method"] == method and r["removed_count"] == n_remove and same_gate_config(r.get("gate_config"), method, overrides)
                   and r.get("gate_screen", 0) == gate_screen(method, args.gate_screen) for r in rows):
                continue
            rows[:] = [r for r in rows if not (r["method"] == method and r["removed_count"] == n_remove)]  # stale
            if method == "sleb":
                if greedy_order is None:
                    search = select_blocks(method, dense.model, windows, targets[-1], args.seed)
                    greedy_order, search_seconds = search.details["order"], search.seconds
                removed, seconds = sorted(greedy_order[:n_remove]), search_seconds
            elif method == "gates":
                selection = select_blocks_with(select_by_gates_with(GateConfig(**overrides)), method, dense.model,
                                               windows, n_remove, args.seed)
                if args.gate_screen:  # as prune does after gate training
                    selection = probed_selection(dense, selection, n_remove, ProbeConfig(sets=0, screen=args.gate_screen))
            else:
                selection = select_blocks(method, dense.model, windows, n_remove, args.seed)
            if method != "sleb":
                removed, seconds = selection.removed, selection.seconds
            model = remove_blocks(copy.deepcopy(dense.model), removed)
            start = time.perf_counter()
            rows.append({"method": method, "removed_count": n_remove, "removed": removed,
                         "parameters": count_parameters(model), "perplexity": evaluate(model),
                         "selection_seconds": seconds, "eval_seconds": time.perf_counter() - start,
                         "gate_config": gate_config(method, overrides), "gate_screen": gate_screen(method, args.gate_screen)})
            print(json.dumps(rows[-1]), file=sys.stderr)
            save()
    print_table(rows, datasets)
    plot(rows, datasets, out.with_suffix(".png"))


def gate_config(method: str, overrides: dict) -> dict | None:
    """The gate hyper-parameters a ``gates`` row is measured with (a row with other ones is measured again)."""
    return asdict(GateConfig(**overrides)) if method == "gates" else None


def gate_screen(method: str, screen: int) -> int:
    """How many near-tied sets a row's selection screened (rows from before the screen have none: 0)."""
    return screen if method == "gates" else 0


# gate settings added after rows were measured, at the values that behave as before they existed
PREDATED_GATE_SETTINGS = {"optimizer": "adam", "hard_steps": 0, "restarts": 1}


def same_gate_config(measured: dict | None, method: str, overrides: dict) -> bool:
    """Whether a row was measured with these gate settings (a setting the row predates had its neutral value)."""
    current = gate_config(method, overrides)
    if measured is None or current is None:
        return measured == current
    return all(measured.get(key, PREDATED_GATE_SETTINGS.get(key)) == value for key, value in current.items())


def previous_rows(out: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run with identical settings (else none)."""
    if not out.is_file():
        return []
    previous = json.loads(out.read_text())
    if {key: previous.get(key) for key in settings} != settings:
        print(f"{out} was measured with other settings; starting afresh", file=sys.stderr)
        return []
    return previous["rows"]


def print_table(rows: list[dict], datasets: list[str]) -> None:
    rows = sorted(rows, key=lambda r: (r["removed_count"], r["method"]))
    print(f"| method | removed | params | {' | '.join(d + ' ppl' for d in datasets)} | scoring s |")
    print("|---|---|---|" + "---|" * len(datasets) + "---|")
    for row in rows:
        ppl = " | ".join(f"{row['perplexity'][d]:.2f}" for d in datasets)
        print(f"| {row['method']} | {row['removed_count']} {row['removed']} | {row['parameters'] / 1e6:.1f}M | {ppl} | {row['selection_seconds']:.1f} |")


def plot(rows: list[dict], datasets: list[str], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4))
    axes = axes if len(datasets) > 1 else [axes]
    for axis, name in zip(axes, datasets):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            points = sorted((r["removed_count"], r["perplexity"][name]) for r in rows if r["method"] == method)
            axis.plot(*zip(*points), marker="o", label=method)
        axis.axhline(rows[0]["perplexity"][name], color="black", linestyle="--", label="dense")
        axis.set_yscale("log")
        axis.set_ylim(0.8 * rows[0]["perplexity"][name], 12 * rows[0]["perplexity"][name])  # catastrophic ones leave the chart
        axis.set_xticks(sorted({r["removed_count"] for r in rows if r["method"] != "dense"}))
        axis.set_xlabel("blocks removed")
        axis.set_ylabel(f"{name} perplexity")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
