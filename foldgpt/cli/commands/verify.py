"""``foldgpt verify``: an output folder against its manifest."""

from __future__ import annotations

import argparse

from foldgpt.core.manifest import verify
from foldgpt.errors import FoldGPTError


def run(args: argparse.Namespace) -> None:
    result = verify(args.folder)
    for name in result.extra:
        print(f"note: {name} is not in the manifest (added after the folder was written)")
    if not result.ok:
        problems = [f"{name} changed" for name in result.changed] + [f"{name} missing" for name in result.missing]
        raise FoldGPTError(f"'{args.folder}' does not match its manifest: {', '.join(problems)}; re-create or re-copy the folder")
    print(f"{args.folder}: all {result.checked} files match the manifest")
