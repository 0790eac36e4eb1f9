"""``foldgpt export --plain``: a compact folder as a vanilla Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from foldgpt.cli.commands.common import load
from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import ExportSettings
from foldgpt.core.outputs import check_output_free
from foldgpt.formats.plain import export_plain, folder_weight_bytes


def run(args: argparse.Namespace) -> None:
    settings: ExportSettings = read_config(args, ExportSettings())
    check_output_free(Path(args.plain), args.overwrite)
    export_plain(load(settings.loading), args.plain, overwrite=args.overwrite)
    print(f"wrote a vanilla Hugging Face folder to {args.plain} ({folder_weight_bytes(args.plain) / 2**20:.1f} MiB of weights)")
