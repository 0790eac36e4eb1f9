"""How much the gates' choice depends on the calibration draw, and whether reading the gates differently steadies it.

    OMP_NUM_THREADS=1 python research/gate_stability.py --seeds 0,1,2 --remove 6

For each seed: draw the standard calibration windows (wikitext2 validation, 8 x 256 tokens) with that seed, train the
gates with the defaults (budget control towards ``--remove`` blocks), and remove blocks by two rules read off the
same run: ``final`` (the smallest final gates, what ``--method gates`` does) and ``mean-last-quarter`` (the smallest
gates averaged over the last quarter of the steps, which smooths the budget controller's step-to-step swings).
Each removal set is scored on held-out *validation* text (WikiText-2 and PTB validation, first ``--max-tokens``
tokens, windows of 1024), never a test split, so the rule can be chosen on it. Block Influence on the same windows is
the reference. With ``{"restarts": K}`` in ``--overrides`` the one rule is ``final``: the restarts' ``ensemble_gates``.
``--ensemble-of-draws`` also scores the set that ``ensemble_gates`` picks from the trajectories of all the draws in
``--out`` trained with the same settings. Prints a table and writes JSON with the gate trajectories.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, load_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import load_model
from foldgpt.selection.config import GateConfig
from foldgpt.selection.gates import ensemble_gates, train_gates
from foldgpt.selection.registry import select_blocks
from foldgpt.surgery.removal import remove_blocks


def smallest(values: list[float], count: int) -> list[int]:
    """The ``count`` blocks with the smallest values (ties: the earlier block), sorted."""
    return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[:count])


def removal_rules(history: list[list[float]], n_remove: int) -> dict[str, list[int]]:
    """Removal sets read off one gate trajectory (one list of gate values per step)."""
    quarter = torch.tensor(history[-max(1, len(history) // 4):]).mean(dim=0).tolist()
    return {"final": smallest(history[-1], n_remove), "mean-last-quarter": smallest(quarter, n_remove)}


def ensemble_of_draws(rows: list[dict], overrides: dict, n_remove: int, nsamples: int) -> dict:
    """The set that ``ensemble_gates`` picks from the trajectories of every calibration draw in ``rows`` trained with
    these settings: what ``--gate-restarts`` would give if its runs saw different windows instead of orders."""
    runs = [row for row in rows if row["rule"] == "trajectory" and row["overrides"] == overrides
            and row.get("remove", n_remove) == n_remove and row.get("nsamples", nsamples) == nsamples]
    if (restarts := overrides.get("restarts", 1)) > 1:
        raise SystemExit(f"--ensemble-of-draws needs single-run trajectories, not restarts={restarts}")
    return {"seed": ",".join(str(row["seed"]) for row in runs), "nsamples": nsamples, "rule": "ensemble-of-draws",
            "overrides": overrides, "removed": smallest(ensemble_gates([row["gate_history"] for row in runs]), n_remove)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", default="0,1,2", help='calibration draws to train on ("" for none)')
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows of 256 tokens per draw")
    parser.add_argument("--max-tokens", type=int, default=8192, help="validation tokens per set")
    parser.add_argument("--overrides", default="{}", help='GateConfig overrides as JSON, e.g. \'{"grad_accum": 2}\'')
    parser.add_argument("--out", default="research/results/gate_stability.json")
    parser.add_argument("--ensemble-of-draws", action="store_true",
                        help="also score the set ensemble_gates picks from every draw's trajectory in --out (these settings)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    held_out = {name: evaluation_windows(tokenize(loaded.tokenizer, load_text(name, "calibration")), 1024, args.max_tokens)
                for name in ("wikitext2", "ptb")}
    scored: dict[tuple[int, ...], dict[str, float]] = {}

    def validation_perplexity(removed: list[int]) -> dict[str, float]:
        if tuple(removed) not in scored:
            model = remove_blocks(copy.deepcopy(loaded.model), removed)
            scored[tuple(removed)] = {name: windows_perplexity(model, windows) for name, windows in held_out.items()}
        return scored[tuple(removed)]

    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    for seed in (int(s) for s in args.seeds.split(",") if s):  # --seeds "": no training, e.g. to score the ensemble
        calibration = load_windows(loaded.tokenizer, "wikitext2", args.nsamples, 256, seed)
        start = time.perf_counter()
        overrides = json.loads(args.overrides)
        trained = train_gates(loaded.model, calibration, GateConfig(**overrides), seed=seed, n_remove=args.remove)
        seconds = time.perf_counter() - start
        rules = (removal_rules(trained.gate_history, args.remove) if trained.restarts == 1
                 else {"final": smallest(trained.gates, args.remove)})  # restarts: their ensemble_gates
        sets = {**rules, "bi": select_blocks("bi", loaded.model, calibration, args.remove, seed).removed}
        for rule, removed in sets.items():
            ppl = validation_perplexity(removed)
            row = {"seed": seed, "nsamples": args.nsamples, "rule": rule, "overrides": overrides if rule != "bi" else {}, "removed": removed, "validation_perplexity": ppl,
                   "mean_log_ppl": sum(math.log(v) for v in ppl.values()) / len(ppl)}
            print(json.dumps(row), flush=True)
            rows.append({**row, "train_seconds": seconds if rule != "bi" else None})
        rows.append({"seed": seed, "rule": "trajectory", "overrides": overrides, "remove": args.remove,
                     "nsamples": args.nsamples, "gate_history": trained.gate_history})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.ensemble_of_draws:
        ensemble = ensemble_of_draws(rows, json.loads(args.overrides), args.remove, args.nsamples)
        ppl = validation_perplexity(ensemble["removed"])
        row = {**ensemble, "validation_perplexity": ppl, "mean_log_ppl": sum(math.log(v) for v in ppl.values()) / len(ppl)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table([r for r in rows if r["rule"] != "trajectory"])


def print_table(rows: list[dict]) -> None:
    print("| seed | gate settings | rule | removed | WikiText-2 val ppl | PTB val ppl |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ppl = row["validation_perplexity"]
        print(f"| {row['seed']} | {json.dumps(row.get('overrides', {}))} | {row['rule']} | {' '.join(map(str, row['removed']))} | {ppl['wikitext2']:.2f} | {ppl['ptb']:.2f} |")


if __name__ == "__main__":
    main()
