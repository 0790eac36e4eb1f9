"""The ``foldgpt`` argument parser: the commands, their descriptions, and the arguments that are not settings
(outputs, inputs). The settings' flags are generated from the torch-free config dataclasses (``foldgpt.cli.settings``,
``foldgpt.workflows.config``), so building the parser, and ``foldgpt --help``, imports no torch."""

from __future__ import annotations

import argparse

from foldgpt.cli.schema import add_config
from foldgpt.cli.settings import (
    AnalyzeSettings,
    EvalSettings,
    ExportSettings,
    FoldSettings,
    HealSettings,
    PruneSettings,
)
from foldgpt.formats.config import DEFAULT_MODEL
from foldgpt.workflows.config import CompressConfig

DESCRIPTIONS = {
    "analyze": ("redundancy analysis: Block Influence, similarity heatmap, angular distance",
                "Measure per-block Block Influence (1 - cos of block input and output), the pairwise cosine similarity of "
                "block outputs and the angular distance of spans; writes analysis.json, similarity_heatmap.png and "
                "block_influence.png to --out."),
    "prune": ("remove blocks and save a plain Hugging Face folder",
              "Pick blocks with METHOD on calibration data, remove them, and save a vanilla Hugging Face folder (loads "
              "with AutoModelForCausalLM, no trust_remote_code) plus foldgpt.json with the method, scores and removed "
              "block indices (original numbering)."),
    "eval": ("perplexity (WikiText-2 / PTB), zero-shot tasks (lm-eval) and efficiency figures",
             "Perplexity with the protocol of the pruning papers: the test split tokenised as one text, non-overlapping "
             "windows of --seqlen tokens, exp(mean next-token NLL). With --tasks: lm-evaluation-harness tasks, offline "
             "(--batch-size is then requests per forward pass); with --efficiency: size, FLOPs, speed and memory. "
             "Perplexity runs by default only without those two."),
    "fold": ("share weights in groups of blocks and save the compact format",
             "Cut the model's blocks, in order, into contiguous groups (give --group-size or --groups); in each group "
             "the children use the parent's linear weights (the same tensors) and keep their own norms. Saves a compact "
             "folder (each shared tensor stored once, group map in config.json) that every foldgpt command loads as "
             "MODEL; 'foldgpt export --plain' turns it into a vanilla Hugging Face folder."),
    "export": ("turn a compact (folded or healed) folder into a vanilla Hugging Face folder, or any model into GGUF",
               "Copy every shared weight to each position (and merge a healed LoRA adapter per position) and save, with "
               "--plain, a folder that AutoModelForCausalLM.from_pretrained loads without trust_remote_code, giving the "
               "same logits as the compact model; with --gguf, a GGUF file that llama.cpp runs (llama, mistral, qwen2, "
               "qwen3, gemma2, gemma3; the block count and per-block settings of the kept blocks, the tokenizer and chat "
               "template), with OUT.gguf.json beside it."),
    "heal": ("LoRA distillation healing of a pruned or folded model from the dense teacher",
             "Train one LoRA adapter per block position and the per-block norms (base weights frozen, shared tensors "
             "stay shared) to match the teacher: logit KL, tail-layer MSE over the last k blocks, LM loss. Writes a "
             "compact folder (shared base + adapter/ + norms) that every foldgpt command loads as MODEL, and with "
             "--plain also DIR/plain, a vanilla HF folder with the adapters merged."),
    "report": ("compare models side by side: report.md, report.json and figures",
               "Read foldgpt compress output folders (dense and compressed model each) and/or JSON files from 'foldgpt "
               "eval --out', and write OUT/report.md and OUT/report.json: parameters, perplexities, task accuracies and "
               "their average, retention against the dense model, speed; plus perplexity_vs_parameters.png and each "
               "run's similarity heatmap and gate trajectory."),
    "verify": ("check an output folder against its manifest (checksums of every file)",
               "Recompute the SHA-256 of every file listed in DIR/manifest.json (written with every foldgpt output "
               "folder) and report changed or missing files; exit status 0 when all match."),
    "compress": ("the whole pipeline: analysis, removal, sharing, healing, evaluation",
                 "Run FoldGPT end to end: dense evaluation -> analysis -> block removal -> grouped sharing -> healing -> "
                 "evaluation, writing DIR/<stage>/ for each stage, DIR/config.yaml (the resolved settings, usable as "
                 "--config), DIR/summary.json and DIR/report/. Rerunning with the same settings skips finished stages "
                 "(resume after a crash); a changed setting redoes only the stages it affects. Every option below is also "
                 "a key of the --config YAML, by section (heal: {steps: 25}) or by its name (heal_steps: 25)."),
}
COMMANDS = tuple(DESCRIPTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldgpt",
        description="Make a decoder-only LLM shallower: measure block redundancy, remove blocks, share weights in groups, "
        "heal, score perplexity.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--data-dir", metavar="DIR", help="folder of the named data sets (default: $FOLDGPT_DATA, else "
                        "../shared/data beside the working directory, else the Hub copies through datasets; docs/data.md)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, description) in DESCRIPTIONS.items():
        ADD[name](commands.add_parser(name, help=summary, description=description))
    return parser


def add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help=f"output folder for {what} (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def add_analyze(parser: argparse.ArgumentParser) -> None:
    add_config(parser, AnalyzeSettings())
    add_output(parser, "analysis.json and the PNG figures")


def add_prune(parser: argparse.ArgumentParser) -> None:
    add_config(parser, PruneSettings())
    add_output(parser, "the pruned model")


def add_eval(parser: argparse.ArgumentParser) -> None:
    add_config(parser, EvalSettings())
    parser.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")


def add_fold(parser: argparse.ArgumentParser) -> None:
    add_config(parser, FoldSettings())
    add_output(parser, "the compact model")


def add_export(parser: argparse.ArgumentParser) -> None:
    add_config(parser, ExportSettings())
    outputs = parser.add_argument_group("outputs (at least one)")
    outputs.add_argument("--plain", metavar="OUT", help="output folder of the vanilla export (written atomically)")
    outputs.add_argument("--gguf", metavar="OUT.gguf", help="output GGUF file for llama.cpp (written atomically, with "
                         "OUT.gguf.json: its settings and SHA-256)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs if they already exist")


def add_heal(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("student", metavar="STUDENT", help="the model to heal: a pruned HF folder or a compact (folded) folder")
    parser.add_argument("--teacher", required=True, metavar="MODEL",
                        help=f"the dense model to distil from: a HF folder, a .gguf file, or '{DEFAULT_MODEL}'")
    add_config(parser, HealSettings())
    run = parser.add_argument_group("resuming")
    run.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint folder (default: <out>.checkpoint; removed after success)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint (same settings; same result as an "
                     "uninterrupted run)")
    parser.add_argument("--plain", action="store_true", help="also write DIR/plain: a vanilla HF folder with the adapters merged "
                        "per position")
    add_output(parser, "the healed compact model (shared base + adapter/ + norms)")


def add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_JSON", help="compress output folders or eval JSON files")
    add_output(parser, "report.md, report.json and the PNG figures")


def add_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a folder written by foldgpt (prune, fold, export, heal, analyze, report, "
                        "a compress stage)")


def add_compress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="settings from a YAML file (e.g. a previous run's config.yaml); "
                        "options given on the command line win")
    add_config(parser, CompressConfig())
    add_output(parser, "all stages' results (an existing DIR from compress is resumed)")


ADD = {"analyze": add_analyze, "prune": add_prune, "eval": add_eval, "fold": add_fold, "export": add_export,
       "heal": add_heal, "report": add_report, "verify": add_verify, "compress": add_compress}
