"""``foldgpt fold``: grouped sharing, saved in the compact format."""

from __future__ import annotations

import argparse
from pathlib import Path

from foldgpt.cli.commands.common import load
from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import FoldSettings
from foldgpt.core.outputs import check_output_free
from foldgpt.formats.plain import folder_weight_bytes
from foldgpt.workflows.fold import fold_model


def run(args: argparse.Namespace) -> None:
    settings: FoldSettings = read_config(args, FoldSettings())
    check_output_free(Path(args.out), args.overwrite)
    sharing = settings.sharing
    result = fold_model(load(settings.loading), group_size=sharing.group_size, groups=sharing.groups, parent=sharing.parent,
                        out=args.out, overwrite=args.overwrite)
    report = result.report
    print(f"{'group':<12}{'parent':>7}{'unique':>14}{'materialised':>14}")
    for group in report.per_group:
        span = f"{group['blocks'][0]}-{group['blocks'][-1]}" if len(group["blocks"]) > 1 else str(group["blocks"][0])
        print(f"{span:<12}{group['parent']:>7}{group['unique']:>14,}{group['materialised']:>14,}")
    print(f"parameters: {report.unique:,} unique, {report.materialised:,} materialised (compression {report.compression:.2f}x); "
          f"weights on disk {folder_weight_bytes(args.out) / 2**20:.1f} MiB; wrote {args.out}")
