"""``foldgpt export --plain / --gguf``: a model (compact ones merged per position) as a vanilla Hugging Face folder
and/or a llama.cpp GGUF file."""

from __future__ import annotations

import argparse
from pathlib import Path

from foldgpt.cli.commands.common import load
from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import ExportSettings
from foldgpt.core.outputs import check_output_free
from foldgpt.errors import FoldGPTError
from foldgpt.formats.gguf_export import check_gguf_type, export_gguf
from foldgpt.formats.plain import export_plain, folder_weight_bytes


def run(args: argparse.Namespace) -> None:
    settings: ExportSettings = read_config(args, ExportSettings())
    if not args.plain and not args.gguf:
        raise FoldGPTError("export needs an output: --plain OUT (a Hugging Face folder) and/or --gguf OUT.gguf")
    for out in (args.plain, args.gguf):
        if out:
            check_output_free(Path(out), args.overwrite)
    check_gguf_type(settings.gguf.type)
    loaded = load(settings.loading)
    if args.gguf:
        path = export_gguf(loaded, args.gguf, settings.gguf.type, overwrite=args.overwrite)
        print(f"wrote a {settings.gguf.type} GGUF file to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.plain:
        export_plain(loaded, args.plain, overwrite=args.overwrite)
        print(f"wrote a vanilla Hugging Face folder to {args.plain} ({folder_weight_bytes(args.plain) / 2**20:.1f} MiB of weights)")
