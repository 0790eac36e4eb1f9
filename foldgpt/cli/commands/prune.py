"""``foldgpt prune``: choose blocks, remove them, save a plain Hugging Face folder (``--fold auto``: or ties, compact)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from foldgpt.cli.commands.common import fold_probe, load, print_fold_choice
from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import PruneSettings
from foldgpt.core.outputs import check_output_free
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel
from foldgpt.selection.config import ProbeConfig, default_calibration
from foldgpt.train.parallel import is_main_process
from foldgpt.workflows.fold_plan import fold_auto
from foldgpt.workflows.prune import parse_blocks, prune
from foldgpt.workflows.prune_blockwise import prune_blockwise


def settings_of(args: argparse.Namespace) -> PruneSettings:
    """The command's settings; the calibration's defaults are the method's (64 windows for the gates)."""
    return read_config(args, PruneSettings(calibration=default_calibration(getattr(args, "method", None))))


def probe_config(settings: PruneSettings) -> ProbeConfig:
    """The screen / probes score on the calibration text's held-out split."""
    return replace(settings.probe, eval_data=settings.calibration.data)


def run(args: argparse.Namespace) -> None:
    settings = settings_of(args)
    check_output_free(Path(args.out), args.overwrite)
    selection, target = settings.selection, settings.target
    if selection.blocks is None and selection.method is None:
        raise FoldGPTError("prune needs --method M and a target (--remove N, ...), or --blocks SPEC")
    folds = settings.sharing.fold == "auto"
    if folds:
        check_fold_auto(settings)
    if settings.offload.offload == "blocks":
        run_blockwise(settings, args.out, args.overwrite)
        return
    blocks = None if selection.blocks is None else parse_blocks(selection.blocks)
    main_process = is_main_process()  # torchrun / accelerate launch (--method gates): rank 0 writes
    result = prune(load(settings.loading), selection.method or "given", calibration=settings.calibration,
                   out=None if folds else args.out,
                   overwrite=args.overwrite, gate_config=settings.gates, granularity=selection.granularity, blocks=blocks,
                   probe=probe_config(settings), remove=target.remove, remove_ratio=target.remove_ratio,
                   target_params=target.target_params, target_flops=target.target_flops, replacement=settings.replacement)
    if not main_process:
        return
    meta = result.metadata
    print(f"{meta['method']}: removed blocks {meta['removed']} of {meta['num_blocks_before']} in {meta['selection_seconds']:.1f}s")
    if "probe" in meta["details"]:
        probe = meta["details"]["probe"]
        how = f"healing probes of {len(probe['candidates'])}" if probe["candidates"] else "lowest held-out perplexity"
        baselines = "".join(f", {name} {removed}" for name, removed in probe.get("baselines", {}).items())
        print(f"the gates' own pick was {probe['first']}; {len(probe['screened'])} sets screened (the gates' near-ties"
              f"{baselines}), {how} chose {probe['chosen']} ({probe['seconds']:.0f}s; --gate-probe-screen 0 keeps the "
              "gates' pick)")
    if selection.granularity == "sublayer":
        single = meta["removed_sublayers"]
        print(f"removed sub-layers of kept blocks: attention {single.get('attention', [])}, MLP {single.get('mlp', [])}")
    print_replacement(meta)
    if folds:
        fold_removal(settings, meta, result.loaded, args.out, args.overwrite)
    else:
        print_sizes(meta, args.out)


def check_fold_auto(settings: PruneSettings) -> None:
    """Refuse, before any selection runs, what ``--fold auto`` cannot weigh."""
    if settings.offload.offload == "blocks":
        raise FoldGPTError("--fold auto fits and heals its candidates with the whole model in memory; drop --offload blocks")
    if settings.selection.granularity != "block":
        raise FoldGPTError("--fold auto weighs removals of whole blocks; drop --granularity sublayer")


def fold_removal(settings: PruneSettings, meta: dict, pruned: LoadedModel, out: str, overwrite: bool) -> None:
    """``--fold auto``: the removal just made (in memory) against one block fewer plus ties at its unique parameters,
    built on fresh copies of the input model, each healed first (``foldgpt.workflows.fold_plan``); the kept one is
    written to ``out`` as a compact folder whose ``foldgpt.json`` keeps the removal's record as its source."""
    chosen = fold_auto(pruned, load(settings.loading), load(settings.loading), meta["removed"], settings.ties, out=out,
                       overwrite=overwrite, probe=fold_probe(settings.ties), source_metadata=meta)
    print_fold_choice(chosen.metadata)
    print(f"parameters {meta['parameters_before']:,} -> {chosen.report.unique:,} unique "
          f"({chosen.report.unique / meta['parameters_before']:.1%}); wrote {out} (compact: load it with foldgpt, "
          "'foldgpt export --plain' for a vanilla folder)")


def run_blockwise(settings: PruneSettings, out: str, overwrite: bool) -> None:
    """``--offload blocks``: the selection block by block, the kept tensors copied file to file."""
    selection, target, model = settings.selection, settings.target, settings.loading
    if selection.blocks is not None:
        raise FoldGPTError("--blocks names the blocks to remove: give it without --offload blocks")
    if settings.probe.sets:
        raise FoldGPTError("--gate-probe-sets needs the model in memory (it heals copies of it); drop --offload blocks")
    if selection.granularity != "block":
        raise FoldGPTError("--offload blocks removes whole blocks; drop --granularity")
    meta = prune_blockwise(model.model, selection.method or "", calibration=settings.calibration, out=out, overwrite=overwrite,
                           dtype=model.dtype, device=model.device, offload_dir=settings.offload.offload_dir,
                           remove=target.remove, remove_ratio=target.remove_ratio, target_params=target.target_params,
                           target_flops=target.target_flops, replacement=settings.replacement)
    print(f"{selection.method}: removed blocks {meta['removed']} of {meta['num_blocks_before']} in "
          f"{meta['selection_seconds']:.1f}s (block by block; peak resident memory {meta['peak_rss_bytes'] / 2**20:.0f} MiB)")
    print_replacement(meta)
    print_sizes(meta, out)


def print_replacement(meta: dict) -> None:
    """One line per replaced span: where its map went and how much of the stream's error it removed (nothing when
    the held-out check dropped the maps: it has warned)."""
    if not meta.get("replacement", {}).get("check", {}).get("kept", True):
        return
    for span in meta.get("replacement", {}).get("spans", []):
        blocks = span["removed"]
        print(f"blocks {blocks[0]}-{blocks[-1]} replaced by a linear map in block {span['carrier']}'s MLP output: "
              f"relative error of the stream after them {span['error_without']:.4f} -> {span['fit_error']:.4f}")


def print_sizes(meta: dict, out: str) -> None:
    print(f"parameters {meta['parameters_before']:,} -> {meta['parameters_after']:,} "
          f"({meta['parameters_after'] / meta['parameters_before']:.1%}); FLOPs/token "
          f"{meta['flops_per_token_after'] / meta['flops_per_token_before']:.1%} of dense; wrote {out}")
