"""Grouped sharing on one model: parameters, disk size, load memory and perplexity for each group size.

    python benchmarks/sharing.py --groups 1,2,3,4 --remove 0,6 --out benchmarks/results/sharing.json

For each number of removed blocks (by learned gates with their defaults, on the default calibration, WikiText-2
validation 16 x 256 tokens; 0 =
the dense model) and each group size G (1 = no sharing), without healing: the folded model is saved in the compact
format and exported plain; the script reports unique and materialised parameters, the weight bytes of both folders,
the peak resident memory a fresh process gains loading each folder and running a 4-token forward pass, and WikiText-2 perplexity on the first
``--max-tokens`` test tokens in windows of ``--seqlen``. Prints a table; writes JSON and a PNG (perplexity against
unique parameters). The gates-pruned models are cached under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import foldgpt
from foldgpt.data.config import CalibrationConfig
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.plain import export_plain, folder_weight_bytes
from foldgpt.workflows.fold import fold_model

MEMORY_PROBE = """
import sys, torch, transformers, foldgpt
from foldgpt.models import load_model
from transformers import AutoModelForCausalLM

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
model = load_model(sys.argv[1]).model if sys.argv[2] == "compact" else AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():  # weights are memory-mapped lazily: touch them all with one short forward pass
    model(torch.tensor([[1, 2, 3, 4]]))
print(status("VmHWM") - before)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--groups", default="1,2,3,4", help="comma-separated group sizes")
    parser.add_argument("--remove", default="0,6", help="comma-separated numbers of blocks removed by gates first")
    parser.add_argument("--seqlen", type=int, default=1024, help="evaluation window")
    parser.add_argument("--max-tokens", type=int, default=16384, help="WikiText-2 test tokens; 0 = the whole split")
    parser.add_argument("--work", default="runs/bench", help="where the pruned, compact and plain folders go")
    parser.add_argument("--out", default="benchmarks/results/sharing.json")
    return parser.parse_args()


def pruned_source(model: str, remove: int, work: Path) -> str:
    """The model with ``remove`` blocks removed by gates (default settings), pruned once and cached."""
    if remove == 0:
        return model
    folder = work / f"gates{remove}"
    if not (folder / "foldgpt.json").is_file():
        print(f"pruning {remove} blocks with gates into {folder} (once)", flush=True)
        foldgpt.prune(foldgpt.load(model), method="gates", remove=remove, out=folder, overwrite=True,
                      calibration=CalibrationConfig())
    return str(folder)


def load_peak_bytes(folder: Path, kind: str) -> int:
    """Peak RSS a fresh Python process gains loading ``folder`` and running one 4-token forward (after its imports)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), kind], check=True, capture_output=True, text=True)
    return int(result.stdout.strip().splitlines()[-1])


def measure(source: str, remove: int, group_size: int, args: argparse.Namespace, work: Path) -> dict:
    compact, plain = work / f"r{remove}-g{group_size}", work / f"r{remove}-g{group_size}-plain"
    folded = fold_model(foldgpt.load(source), group_size=group_size, out=compact, overwrite=True)
    export_plain(foldgpt.load(str(compact)), plain, overwrite=True)
    start = time.perf_counter()
    ppl = perplexity(folded.loaded.model, folded.loaded.tokenizer, "wikitext2", args.seqlen, args.max_tokens or None)
    report = folded.report
    return {
        "removed_blocks": remove,
        "group_size": group_size,
        "blocks": sum(len(group) for group in folded.metadata["groups"]),
        "unique_parameters": report.unique,
        "materialised_parameters": report.materialised,
        "compact_weight_bytes": folder_weight_bytes(compact),
        "plain_weight_bytes": folder_weight_bytes(plain),
        "load_peak_compact_bytes": load_peak_bytes(compact, "compact"),
        "load_peak_plain_bytes": load_peak_bytes(plain, "plain"),
        "wikitext2_ppl": ppl.perplexity,
        "eval_tokens": ppl.tokens,
        "eval_seconds": time.perf_counter() - start,
    }


def print_table(rows: list[dict]) -> None:
    mib = 2**20
    print(f"{'removed':>7} {'G':>2} {'unique':>9} {'material.':>9} {'compact MiB':>11} {'plain MiB':>9} "
          f"{'RSS compact':>11} {'RSS plain':>9} {'wiki ppl':>9}")
    for r in rows:
        print(f"{r['removed_blocks']:>7} {r['group_size']:>2} {r['unique_parameters'] / 1e6:>8.1f}M {r['materialised_parameters'] / 1e6:>8.1f}M "
              f"{r['compact_weight_bytes'] / mib:>11.1f} {r['plain_weight_bytes'] / mib:>9.1f} "
              f"{r['load_peak_compact_bytes'] / mib:>11.1f} {r['load_peak_plain_bytes'] / mib:>9.1f} {r['wikitext2_ppl']:>9.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for remove in sorted({r["removed_blocks"] for r in rows}):
        points = sorted((r["unique_parameters"] / 1e6, r["wikitext2_ppl"], r["group_size"]) for r in rows if r["removed_blocks"] == remove)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{remove} blocks removed (gates)")
        for x, y, g in points:
            ax.annotate(f"G={g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("unique parameters (M)")
    ax.set_ylabel("WikiText-2 perplexity (no healing)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for remove in (int(x) for x in args.remove.split(",")):
        source = pruned_source(args.model, remove, work)
        for group_size in (int(x) for x in args.groups.split(",")):
            rows.append(measure(source, remove, group_size, args, work))
            print_table(rows[-1:])
            sys.stdout.flush()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "eval_seqlen": args.seqlen, "eval_max_tokens": args.max_tokens,
                               "rows": rows}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
