"""Does the fold pay? Removal only against ``--fold auto`` at the same unique parameters, healed alike (issue 22).

    OMP_NUM_THREADS=1 python benchmarks/fold_vs_remove.py --targets 0.75,0.60 --seeds 0 \
        --gates 0.75=3,4,5,6,7,12,13,14,25,26 --out benchmarks/results/fold_vs_remove.json

For each ``--targets`` fraction F of SmolLM2-135M's parameters (embeddings counted, as ``--target-params``):

- ``bi``: ``prune --method bi --target-params F`` (removal only);
- ``gates``: the set given by ``--gates F=BLOCKS`` (e.g. the one ``compress`` removed at that target), removal only;
- ``auto``: ``compress --fold auto``'s fold stage on ``bi``'s removal: removal only against one block fewer and the
  fewest fitted ties that meet the same unique parameters (``TieConfig()``), each healed by the default heal first,
  the lower on held-out WikiText-2 validation text kept (the choice is recorded; where it keeps removal, ``auto`` is
  ``bi``).

Each is healed with ``HealConfig(seed=S)`` (25 x 1,024 Alpaca tokens) for every ``--seeds`` S, and scored before
and after on WikiText-2 and PTB *test* (the first 16,384 tokens in windows of 1,024), with its unique parameters
(LoRA adapters counted), its weight bytes on disk and its decode speed (batch 1, 32 tokens). ``--tasks`` adds the
zero-shot tasks at ``--limit``. Results accumulate in ``--out`` (an interrupted run continues); a PNG of healed
WikiText-2 perplexity against unique parameters is written beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from foldgpt.core.outputs import read_metadata  # noqa: E402
from foldgpt.eval.efficiency import measure_efficiency  # noqa: E402
from foldgpt.eval.lm_tasks import DEFAULT_TASKS, evaluate_tasks  # noqa: E402
from foldgpt.eval.perplexity import perplexity  # noqa: E402
from foldgpt.formats.loading import LoadedModel, load_model  # noqa: E402
from foldgpt.formats.plain import folder_weight_bytes  # noqa: E402
from foldgpt.healing.config import HealConfig  # noqa: E402
from foldgpt.healing.loop import heal  # noqa: E402
from foldgpt.surgery.config import TieConfig  # noqa: E402
from foldgpt.surgery.sharing import parameter_report  # noqa: E402
from foldgpt.workflows.fold_plan import fold_auto  # noqa: E402
from foldgpt.workflows.prune import prune  # noqa: E402

TEXTS = ("wikitext2", "ptb")


def scores(loaded: LoadedModel, args: argparse.Namespace) -> dict[str, float]:
    return {name: perplexity(loaded.model, loaded.tokenizer, name, 1024, args.max_tokens).perplexity for name in TEXTS}


def students(args: argparse.Namespace, target: float) -> dict[str, Path]:
    """The variants' folders for one target, each built once under ``--work``."""
    work = Path(args.work) / f"t{target}"
    folders: dict[str, Path] = {}
    bi = work / "bi"
    if not bi.is_dir():
        prune(load_model(args.model), "bi", target_params=target, out=bi)
    folders["bi"] = bi
    if target in args.gates:
        gates = work / "gates"
        if not gates.is_dir():
            prune(load_model(args.model), "gates", blocks=args.gates[target], out=gates)
        folders["gates"] = gates
    auto = work / "auto"
    if "auto" in args.variants.split(",") and not auto.is_dir():  # the tie fit and two probe heals: build it only if asked
        fold_auto(load_model(str(bi)), load_model(args.model), load_model(args.model), read_metadata(bi)["removed"],
                  TieConfig(), out=auto, probe=HealConfig())
    if auto.is_dir():
        folders["auto"] = auto
    return folders


def measure(name: str, folder: Path, seed: int, dense: LoadedModel, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    student = load_model(str(folder))
    row: dict = {"variant": name, "folder": str(folder), "seed": seed, "before": scores(student, args)}
    meta = read_metadata(folder)
    row["removed"] = meta.get("removed") or meta.get("ties", {}).get("removed") or meta.get("source_metadata", {}).get("removed")
    row["fold_choice"] = meta.get("fold_choice")
    row["fold_candidates"] = meta.get("fold_candidates")
    healed = heal(student, dense, HealConfig(seed=seed), out=Path(args.work) / "healed" / f"{folder.parent.name}-{name}-s{seed}",
                  overwrite=True)
    row["after"] = scores(healed.loaded, args)
    row["unique_parameters"] = parameter_report(healed.loaded.model.get_base_model()).unique
    row["weight_bytes"] = folder_weight_bytes(healed.loaded.source)
    row["decode_tokens_per_s"] = measure_efficiency(healed.loaded.model, healed.loaded.source).decode_tokens_per_s
    if args.tasks:
        row["tasks"] = evaluate_tasks(healed.loaded.model, healed.loaded.tokenizer, DEFAULT_TASKS, limit=args.limit).metrics
    row["seconds"] = time.perf_counter() - start
    return row


def plot(record: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for variant, marker in (("bi", "o"), ("gates", "s"), ("auto", "^"), ("auto-trained", "v")):
        rows = [row for row in record["rows"] if row["variant"] == variant]
        if rows:
            axis.scatter([r["unique_parameters"] / 1e6 for r in rows], [r["after"]["wikitext2"] for r in rows],
                         marker=marker, label=variant)
    axis.set_xlabel("unique parameters (M, LoRA included)")
    axis.set_ylabel("WikiText-2 test perplexity, healed")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="0.85,0.75,0.60")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--gates", action="append", default=[], metavar="F=BLOCKS",
                        help="the gates' removal at target F, e.g. 0.75=3,4,5,6,7,12,13,14,25,26")
    parser.add_argument("--variants", default="bi,gates,auto", help="which of the variants to heal and score")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--tasks", action="store_true")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--work", default="runs/fold_vs_remove")
    parser.add_argument("--out", default="benchmarks/results/fold_vs_remove.json")
    args = parser.parse_args()
    args.gates = {float(k): [int(b) for b in v.split(",")] for k, v in (item.split("=") for item in args.gates)}
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"model": args.model, "rows": []}
    done = {(row["target"], row["variant"], row["seed"]) for row in record["rows"]}
    dense = load_model(args.model)
    for target in (float(t) for t in args.targets.split(",")):
        for name, folder in students(args, target).items():
            if name not in args.variants.split(","):
                continue
            for seed in (int(s) for s in args.seeds.split(",")):
                if (target, name, seed) in done:
                    continue
                row = {"target": target, **measure(name, folder, seed, dense, args)}
                record["rows"].append(row)
                print(json.dumps({k: row[k] for k in ("target", "variant", "seed", "before", "after", "unique_parameters",
                                                      "fold_choice")}), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(record, indent=2) + "\n")
                plot(record, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
