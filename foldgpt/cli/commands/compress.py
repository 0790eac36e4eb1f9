"""``foldgpt compress``: the whole pipeline, resumable stage by stage."""

from __future__ import annotations

import argparse

from foldgpt.cli.schema import read_config
from foldgpt.workflows.compress import CompressConfig, config_from_file, run_pipeline


def run(args: argparse.Namespace) -> None:
    """Defaults < the ``--config`` YAML < the command line."""
    base = config_from_file(args.config) if args.config else CompressConfig()
    config: CompressConfig = read_config(args, base)
    run_pipeline(config, args.out, overwrite=args.overwrite)
