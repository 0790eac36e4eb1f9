"""``--replace linear`` against plain removal on SmolLM2-135M, each set with and without its fitted maps.

    OMP_NUM_THREADS=1 python benchmarks/replacement.py perplexity --out benchmarks/results/replacement.json
    OMP_NUM_THREADS=1 python benchmarks/replacement.py tasks --out benchmarks/results/replacement.json
    OMP_NUM_THREADS=1 python benchmarks/replacement.py heal --out benchmarks/results/replacement.json

The removal table's protocol (README "Results"): every method calibrated on the same 64 x 256 WikiText-2 validation
windows (seed 0), WikiText-2 and PTB test perplexity on the first 16,384 tokens in windows of 1,024. The sets of 4,
6 and 8 blocks and their plain perplexities are that table's (``benchmarks/results/removal_methods_n64_screen.json``:
the gates there are today's ``GateConfig`` with the screen, so their 3 x 80 steps are not trained again); the
``--target-params`` count (blocks, as ``prune`` counts it) is selected here, bi and angular only unless
``--train-gates``. Each set's maps are fitted as ``prune --replace linear`` fits them by default: 16 windows of 1,024
tokens of the same text and seed (as many tokens as the selection's 64 x 256; the former default, 64 x 256, is in
``benchmarks/results/replacement_fit64x256.json``). ``tasks``: the five tasks at ``--limit
200`` for the ``--tasks-for`` counts. ``heal``: the ``--heal-for`` counts of ``--heal-methods`` healed with the
default budget (``HealConfig()``), with and without the maps, then WikiText-2 / PTB test again. Results accumulate
in ``--out``; what is there is skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from foldgpt.data.config import CalibrationConfig
from foldgpt.data.windows import load_windows
from foldgpt.eval.lm_tasks import evaluate_tasks
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.selection.base import select_blocks_with
from foldgpt.selection.config import PRUNE_SCREEN, GateConfig
from foldgpt.selection.gates import select_by_gates_with
from foldgpt.selection.registry import select_blocks
from foldgpt.surgery.budget import RemovalTarget, blocks_to_remove
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.workflows.config import COMPRESS_TASKS
from foldgpt.workflows.prune import probed_selection
from foldgpt.workflows.replace import replace_removed

REMOVAL_TABLE = Path("benchmarks/results/removal_methods_n64_screen.json")
CALIBRATION = CalibrationConfig(nsamples=64)
"""The removal table's calibration (the maps take their text and seed, and ``ReplacementConfig()``'s windows)."""
DATASETS = ("wikitext2", "ptb")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("perplexity", "tasks", "heal"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="bi,angular,gates")
    parser.add_argument("--remove", default="4,6,8", help="block counts, besides --target-params")
    parser.add_argument("--target-params", type=float, default=0.75)
    parser.add_argument("--tasks-for", default="8", help="block counts whose rows get the tasks ('p' = --target-params)")
    parser.add_argument("--heal-for", default="6,p")
    parser.add_argument("--heal-methods", default="bi")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--train-gates", action="store_true", help="train the gates where the table has no set")
    parser.add_argument("--work", default="runs/replacement", help="healed folders (ignored by git)")
    parser.add_argument("--out", default="benchmarks/results/replacement.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    dense = load_model(args.model)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"model": dense.source, "rows": []}
    params_count = blocks_to_remove(dense.model, RemovalTarget(target_params=args.target_params))
    counts = {str(n): int(n) for n in args.remove.split(",")} | {"p": params_count}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    if args.stage == "perplexity" and not any(r["method"] == "dense" for r in results["rows"]):
        table = table_row("dense", 0)
        assert table is not None
        results["rows"].append({"method": "dense", "removed": [], "replace": "none", "parameters": table["parameters"],
                                "perplexity": table["perplexity"], "perplexity_from": str(REMOVAL_TABLE)})
        save()
    wanted = {"perplexity": counts, "tasks": pick(counts, args.tasks_for), "heal": pick(counts, args.heal_for)}[args.stage]
    for method in args.methods.split(","):
        if args.stage == "heal" and method not in args.heal_methods.split(","):
            continue
        for label, n_remove in wanted.items():
            removed = chosen_set(results, dense, method, n_remove, save, args.train_gates)
            if removed is None:
                continue
            for replace in ("none", "linear"):
                row = find_row(results, method, n_remove, replace)
                if row is None:
                    row = {"method": method, "removed_count": n_remove, "target": "params" if label == "p" else "blocks",
                           "removed": removed, "replace": replace}
                    results["rows"].append(row)
                measure(args, row, dense, method, removed, replace)
                print(json.dumps({k: v for k, v in row.items() if k != "spans"}), file=sys.stderr, flush=True)
                save()
    print_table(results["rows"])


def pick(counts: dict[str, int], labels: str) -> dict[str, int]:
    return {label: counts[label] for label in labels.split(",")}


def evaluate(loaded: LoadedModel) -> dict[str, float]:
    return {name: perplexity(loaded.model, loaded.tokenizer, name, 1024, 16384).perplexity for name in DATASETS}


def chosen_set(results: dict, dense: LoadedModel, method: str, n_remove: int, save, train_gates: bool) -> list[int] | None:
    """The blocks ``method`` removes for ``n_remove``: the removal table's set, else selected on its calibration
    windows (the gates only with ``train_gates``); cached in ``results``."""
    cache = results.setdefault("sets", {})
    key = f"{method}:{n_remove}"
    if key not in cache:
        table = table_row(method, n_remove)
        if table is not None:
            cache[key] = table["removed"]
        elif method == "gates" and not train_gates:
            print(f"no gates row for {n_remove} blocks in {REMOVAL_TABLE}: skipped (--train-gates trains them)", file=sys.stderr)
            return None
        else:
            cache[key] = select(dense, method, n_remove)
        save()
    return cache[key]


def select(dense: LoadedModel, method: str, n_remove: int) -> list[int]:
    """``method``'s set on the table's calibration windows (the gates with their default screen, as prune runs them)."""
    windows = load_windows(dense.tokenizer, CALIBRATION.data, CALIBRATION.nsamples, CALIBRATION.seqlen, CALIBRATION.seed)
    if method != "gates":
        return select_blocks(method, dense.model, windows, n_remove, CALIBRATION.seed).removed
    selection = select_blocks_with(select_by_gates_with(GateConfig()), "gates", dense.model, windows, n_remove,
                                   CALIBRATION.seed)
    return probed_selection(dense, selection, n_remove, PRUNE_SCREEN, CALIBRATION, windows).removed


def table_row(method: str, n_remove: int) -> dict | None:
    rows = json.loads(REMOVAL_TABLE.read_text())["rows"]
    return next((r for r in rows if r["method"] == method and r["removed_count"] == n_remove), None)


def find_row(results: dict, method: str, n_remove: int, replace: str) -> dict | None:
    return next((r for r in results["rows"] if r["method"] == method and r.get("removed_count") == n_remove
                 and r["replace"] == replace), None)


def replaced_model(dense: LoadedModel, method: str, removed: list[int], replace: str) -> tuple[LoadedModel, dict | None]:
    """A copy of the dense model without ``removed``, with its maps when ``replace`` is linear (as prune fits them)."""
    model = copy.deepcopy(dense.model)
    report = None
    if replace == "linear":
        config = ReplacementConfig("linear")
        windows = load_windows(dense.tokenizer, CALIBRATION.data, config.nsamples, config.seqlen, CALIBRATION.seed)
        report, _ = replace_removed(ResidentBlocks(model), windows, removed, config)
    remove_blocks(model, removed)
    return LoadedModel(model, dense.tokenizer, f"{dense.source}-{method}-{len(removed)}-{replace}"), report


def measure(args: argparse.Namespace, row: dict, dense: LoadedModel, method: str, removed: list[int], replace: str) -> None:
    """Fill the stage's keys of ``row`` (those present are kept)."""
    table = table_row(method, len(removed)) if replace == "none" else None
    if args.stage == "perplexity" and "perplexity" not in row and table is not None and table["removed"] == removed:
        row.update(parameters=table["parameters"], perplexity=table["perplexity"], perplexity_from=str(REMOVAL_TABLE))
    elif args.stage == "perplexity" and "perplexity" not in row:
        start = time.perf_counter()
        student, report = replaced_model(dense, method, removed, replace)
        row.update(parameters=count_parameters(student.model), fit_seconds=time.perf_counter() - start,
                   spans=None if report is None else report["spans"], perplexity=evaluate(student),
                   fit={"nsamples": ReplacementConfig().nsamples, "seqlen": ReplacementConfig().seqlen} if report else None)
    elif args.stage == "tasks" and "tasks" not in row:
        student, _ = replaced_model(dense, method, removed, replace)
        metrics = evaluate_tasks(student.model, student.tokenizer, COMPRESS_TASKS, limit=args.limit).metrics
        row["tasks"] = {"limit": args.limit, **metrics}
    elif args.stage == "heal" and "healed" not in row:
        student, _ = replaced_model(dense, method, removed, replace)
        start = time.perf_counter()
        result = heal(student, dense, HealConfig(), out=Path(args.work) / f"{method}{len(removed)}-{replace}", overwrite=True)
        row["healed"] = {"budget": "HealConfig()", "seconds": time.perf_counter() - start,
                         "perplexity": evaluate(result.loaded)}


def print_table(rows: list[dict]) -> None:
    print("| method | removed | replace | params | WikiText-2 | PTB | healed WikiText-2 | healed PTB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r.get("removed_count", 0), r["method"], r["replace"])):
        if "perplexity" not in row:
            continue
        ppl = row["perplexity"]
        healed = row.get("healed", {}).get("perplexity", {})
        print(f"| {row['method']} | {row.get('removed_count', 0)} {row['removed']} | {row['replace']} | "
              f"{row['parameters'] / 1e6:.2f}M | {ppl['wikitext2']:.2f} | {ppl['ptb']:.2f} | "
              f"{healed.get('wikitext2', float('nan')):.2f} | {healed.get('ptb', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
