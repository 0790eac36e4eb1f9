"""Distillation healing on SmolLM2-135M: WikiText-2 perplexity before and after, per loss combination, and throughput.

    OMP_NUM_THREADS=1 python benchmarks/healing.py --tokens 6144 --seqlen 256

Students (cached under ``--work``, which is ignored by git): (a) ``gates6``: 6 blocks removed by the learned gates
(default ``GateConfig``), (b) ``gates6-g2``: the same folded in contiguous groups of 2 (parent: first block), (c)
``bi6``: 6 blocks removed by Block Influence, (d) ``gates6-c8``: the gates on 8 calibration windows instead of 16
((a) keeps the 16 it was measured with, although the gates' default is now 64), (e) ``gates6-now``: the gates with
today's defaults (64 windows, ``GateConfig()``: 3 restarts), (f) ``gates6-lora``: the same with heal-aware gates
(``GateConfig(lora_rank=8)``), (g) ``gates4`` / (h) ``bi4`` and (i) ``gates8`` / (j) ``bi8``: the 4 or 8 blocks the gates (defaults) and bi removed in the
64-window removal table (``benchmarks/results/removal_methods_n64.json``), removed with ``prune(blocks=...)``; (k)
``gates6-probed``: the gates followed by healing probes, what ``foldgpt compress`` removes by default (gate training
and three probe heals: about 22 minutes here); and any folder given as ``--student NAME=DIR``. Each is healed from the dense model
on ``--data`` (Alpaca by default) for ``--tokens`` tokens with KL + tail + LM; the ``--ablation-cases`` are also
healed with KL only and KL + tail. The teacher's outputs are cached once on disk (``--work/teacher-cache``) and shared
by every run (the runs see the same windows).
Perplexity: WikiText-2 test, the first ``--max-tokens`` tokens in windows of ``--eval-seqlen`` (docs/design.md section 8).

Throughput (``--throughput-steps``): a healing step with the teacher computed on the fly against a plain step of the same
student (forward + backward of the LM loss with every weight trainable) plus a teacher forward, on the same windows.

Results accumulate in ``--out`` (JSON) after every measurement; re-running with the same settings skips what is there,
so an interrupted benchmark continues where it stopped. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import foldgpt
from foldgpt.eval.perplexity import perplexity
from foldgpt.healing.config import HealConfig
from foldgpt.healing.data import healing_windows
from foldgpt.healing.loop import heal
from foldgpt.selection.config import PIPELINE_PROBE_SETS, GateConfig, ProbeConfig

LOSS_SETS = {"kl": (1.0, 0.0, 0.0), "kl+tail": (1.0, 1.0, 0.0), "kl+tail+lm": (1.0, 1.0, 1.0)}
CASES = {"gates6": "(a) gates, 6 removed", "gates6-g2": "(b) gates, 6 removed + G=2 sharing", "bi6": "(c) bi, 6 removed",
         "gates6-c8": "(d) gates, 6 removed, 8 calibration windows",
         "gates6-now": "(e) gates, 6 removed, today's defaults (64 windows, 3 restarts)",
         "gates6-lora": "(f) heal-aware gates (rank-8 LoRA trains with them), 6 removed",
         "gates4": "(g) gates, 4 removed (the 64-window removal table's set)",
         "bi4": "(h) bi, 4 removed (the 64-window removal table's set)",
         "gates8": "(i) gates, 8 removed (the 64-window removal table's set)",
         "bi8": "(j) bi, 8 removed (the 64-window removal table's set)",
         "gates6-probed": "(k) gates + healing probes (compress's default), 6 removed"}
REMOVAL_TABLE = Path("benchmarks/results/removal_methods_n64.json")


def prepare_students(model: str, work: Path, needed: set[str]) -> dict[str, Path]:
    """The ``needed`` students as folders under ``work``, each pruned once (gate training takes minutes on a CPU, so
    a case that is not asked for is not built)."""
    folders = {name: work / name for name in CASES}
    if "gates6-g2" in needed:  # folded from gates6
        needed = needed | {"gates6"}

    def missing(name: str) -> bool:
        return name in needed and not (folders[name] / "config.json").is_file()

    for method, name in (("gates", "gates6"), ("bi", "bi6")):
        if missing(name):  # 16 windows: prune's default when the table was measured
            foldgpt.prune(foldgpt.load(model), method=method, remove=6, out=folders[name],
                          calibration=foldgpt.CalibrationConfig(nsamples=16))
    if missing("gates6-g2"):
        foldgpt.fold_model(foldgpt.load(str(folders["gates6"])), group_size=2, out=folders["gates6-g2"])
    if missing("gates6-c8"):
        foldgpt.prune(foldgpt.load(model), method="gates", remove=6, out=folders["gates6-c8"],
                      calibration=foldgpt.CalibrationConfig(nsamples=8))
    if missing("gates6-now"):  # prune's calibration default: 64 windows for gates
        foldgpt.prune(foldgpt.load(model), method="gates", remove=6, out=folders["gates6-now"])
    if missing("gates6-lora"):
        foldgpt.prune(foldgpt.load(model), method="gates", remove=6, out=folders["gates6-lora"],
                      gate_config=GateConfig(lora_rank=8))
    if missing("gates6-probed"):  # what `foldgpt compress` removes by default: the gates, then 3 healing probes
        foldgpt.prune(foldgpt.load(model), method="gates", remove=6, out=folders["gates6-probed"],
                      probe=ProbeConfig(sets=PIPELINE_PROBE_SETS))
    for method, count in (("gates", 4), ("bi", 4), ("gates", 8), ("bi", 8)):
        if missing(f"{method}{count}"):
            foldgpt.prune(foldgpt.load(model), blocks=removal_table_set(method, count), out=folders[f"{method}{count}"])
    return folders


def removal_table_set(method: str, count: int) -> list[int]:
    """The blocks ``method`` (with its defaults) removed for ``count`` in the 64-window removal table, so that the
    students are the ones that table scored without running the gates' 3 x 80 steps again."""
    rows = json.loads(REMOVAL_TABLE.read_text())["rows"]
    matches = [row["removed"] for row in rows if row["method"] == method and row["removed_count"] == count
               and (row.get("gate_config") or {}).get("restarts", 3) == 3]
    if len(matches) != 1:
        raise SystemExit(f"{REMOVAL_TABLE}: expected one {method} row removing {count} blocks, found {len(matches)}")
    return matches[0]


def ppl(loaded, args: argparse.Namespace) -> float:
    return perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=args.eval_seqlen, max_tokens=args.max_tokens).perplexity


def heal_config(args: argparse.Namespace, loss_set: str, work: Path) -> HealConfig:
    kl, tail, lm = LOSS_SETS[loss_set]
    return HealConfig(data=args.data, tokens=args.tokens, seqlen=args.seqlen, micro_batch=args.micro_batch, lr=args.lr,
                      kl_weight=kl, tail_weight=tail, lm_weight=lm, tail_layers=args.tail_layers, seed=args.seed,
                      eval_windows=args.eval_windows, teacher_cache=str(teacher_cache_folder(args, work)), checkpoint_every=0)


def teacher_cache_folder(args: argparse.Namespace, work: Path) -> Path:
    """One cache per data set, seed and window length: they choose the windows, and a cache is refused for other windows (a larger
    budget only adds windows to the cache)."""
    if args.seed == 0 and args.seqlen == 256 and args.data == "alpaca":
        return work / "teacher-cache"
    return work / (f"teacher-cache-seed{args.seed}" + (f"-seqlen{args.seqlen}" if args.seqlen != 256 else "")
                   + (f"-{args.data}" if args.data != "alpaca" else ""))


def throughput(student, teacher, args: argparse.Namespace) -> dict:
    """Tokens/s of healing steps (teacher on the fly) and of plain student forward+backward + teacher forward."""
    steps = args.throughput_steps
    tokens = steps * args.seqlen
    config = HealConfig(data=args.data, steps=steps + 1, seqlen=args.seqlen, lr=args.lr, tail_layers=args.tail_layers,
                        lm_weight=1.0, eval_windows=0, checkpoint_every=0, seed=args.seed)
    result = heal(student, teacher, config)
    heal_seconds = sum(record["seconds"] for record in result.history[1:])  # the first step is a warm-up
    base = result.loaded.model.unload()  # the plain student, without LoRA
    windows, _ = healing_windows(student.tokenizer, args.data, args.seqlen, 0, args.seed)
    base.requires_grad_(True)
    base.train()
    elapsed = 0.0
    for index in range(steps + 1):  # the first is a warm-up
        ids = windows[index : index + 1]
        begin = time.perf_counter()
        with torch.no_grad():
            teacher.model(input_ids=ids, use_cache=False)
        logits = base(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        base.zero_grad(set_to_none=True)
        if index:
            elapsed += time.perf_counter() - begin
    return {"steps": steps, "seqlen": args.seqlen, "threads": torch.get_num_threads(),
            "heal_tokens_per_s_teacher_on_the_fly": tokens / heal_seconds,
            "plain_student_fwd_bwd_plus_teacher_fwd_tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="alpaca")
    parser.add_argument("--tokens", type=int, default=6144, help="healing budget per run, in training tokens")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=HealConfig.lr, help="peak learning rate (default: HealConfig.lr)")
    parser.add_argument("--tail-layers", type=int, default=HealConfig.tail_layers)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="gates6-g2,gates6,bi6")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=DIR",
                        help="also heal the pruned (or folded) folder DIR, e.g. from `foldgpt prune`, as case NAME (repeatable)")
    parser.add_argument("--ablation-cases", default="gates6-g2")
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--throughput-steps", type=int, default=3, help="0 = skip the throughput measurement")
    parser.add_argument("--work", default="runs/heal-bench")
    parser.add_argument("--out", default="benchmarks/results/healing.json")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    settings = {k: getattr(args, k) for k in ("model", "data", "tokens", "seqlen", "micro_batch", "tail_layers",
                                               "eval_windows", "seed", "eval_seqlen", "max_tokens")}
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "threads": torch.get_num_threads(), "perplexity": {}, "runs": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    extra = dict(spec.split("=", 1) for spec in args.student)
    cases = [case for case in args.cases.split(",") if case] + list(extra)
    ablations = set(args.ablation_cases.split(",")) if args.ablation_cases else set()
    unknown = sorted(set(cases) - set(CASES) - set(extra))
    if unknown:
        raise SystemExit(f"unknown --cases {', '.join(unknown)}: choose from {', '.join(CASES)} or add --student NAME=DIR")
    needed = set(cases) | ({"gates6-g2"} if args.throughput_steps else set())
    folders = prepare_students(args.model, work, needed)
    folders.update({name: Path(folder) for name, folder in extra.items()})
    teacher = foldgpt.load(args.model)
    if "dense" not in results["perplexity"]:
        results["perplexity"]["dense"] = ppl(teacher, args)
        save()
    plan = [(case, "kl+tail+lm") for case in cases] + [(c, s) for c in cases if c in ablations for s in ("kl", "kl+tail")]
    for case, loss_set in plan:
        if case not in results["perplexity"]:
            results["perplexity"][case] = ppl(foldgpt.load(str(folders[case])), args)
            save()
        key = f"{case}/{loss_set}/lr={args.lr:g}"
        if key in results["runs"]:
            continue
        student = foldgpt.load(str(folders[case]))
        start = time.perf_counter()
        result = heal(student, teacher, heal_config(args, loss_set, work))
        seconds = time.perf_counter() - start
        meta = result.metadata
        results["runs"][key] = {
            "case": case, "folder": str(folders[case]), "losses": loss_set, "lr": args.lr, "ppl_after": ppl(result.loaded, args), "ppl_before": results["perplexity"][case],
            "steps": meta["steps_done"], "tokens": meta["tokens_seen"], "heal_seconds": seconds,
            "train_tokens_per_s": meta["tokens_per_second"], "teacher_windows_computed": meta["teacher_windows_computed"],
            "heldout_before": result.evals[0], "heldout_after": result.evals[-1],
            "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"],
        }
        save()
        print(f"{key}: wikitext2 {results['perplexity'][case]:.2f} -> {results['runs'][key]['ppl_after']:.2f} "
              f"({seconds:.0f}s)", flush=True)
    if args.throughput_steps and "throughput" not in results:
        results["throughput"] = throughput(foldgpt.load(str(folders["gates6-g2"])), teacher, args)
        save()
    print_table(results)


def print_table(results: dict) -> None:
    dense = results["perplexity"]["dense"]
    print(f"\nbudget: {results['settings']['tokens']} tokens of {results['settings']['data']} per run "
          f"(windows of {results['settings']['seqlen']}); dense WikiText-2 ppl {dense:.2f}\n")
    print("| student | losses | lr | ppl before | ppl after | gap recovered (ppl) | gap recovered (log ppl) | heal time (s) "
          "| train tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = list(CASES)
    for run in sorted(results["runs"].values(), key=lambda r: (order.index(r["case"]) if r["case"] in order else len(order),
                                                               -r.get("lr", 0), r["losses"])):
        gap = (run["ppl_before"] - run["ppl_after"]) / (run["ppl_before"] - dense)
        log_gap = math.log(run["ppl_before"] / run["ppl_after"]) / math.log(run["ppl_before"] / dense)
        print(f"| {CASES.get(run['case'], run['case'])} | {run['losses']} | {run.get('lr', 1e-3):g} | {run['ppl_before']:,.2f} | "
              f"{run['ppl_after']:,.2f} | {gap:.0%} | {log_gap:.0%} | {run['heal_seconds']:.0f} | {run['train_tokens_per_s']:.1f} |")
    if "throughput" in results:
        t = results["throughput"]
        print(f"\nthroughput ({t['threads']} thread(s), {t['steps']} x {t['seqlen']} tokens): healing step, teacher on the fly "
              f"{t['heal_tokens_per_s_teacher_on_the_fly']:.1f} tokens/s; plain student forward+backward + teacher forward "
              f"{t['plain_student_fwd_bwd_plus_teacher_fwd_tokens_per_s']:.1f} tokens/s")


if __name__ == "__main__":
    main()
