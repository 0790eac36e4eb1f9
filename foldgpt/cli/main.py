"""The ``foldgpt`` command line. Each subcommand is a thin shell around one workflow function.

The parser is generated from the torch-free config dataclasses (``foldgpt.cli.parsers``); ``dispatch`` imports the
one command module that runs (``foldgpt.cli.commands.<name>``), so ``foldgpt --help`` loads no torch. Errors caused
by input are printed as one line (``foldgpt: error: ...``) with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from foldgpt.cli.parsers import build_parser
from foldgpt.errors import FoldGPTError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt_on_sigterm()
    try:
        with data_dir_setting(args.data_dir):
            dispatch(args)
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


def dispatch(args: argparse.Namespace) -> None:
    """Run ``args.command``: import its module only now (it imports torch and the workflows), then its ``run``."""
    from foldgpt.cli.commands.common import prepare  # noqa: PLC0415

    prepare(args.command, getattr(args, "method", None))
    command = importlib.import_module(f"foldgpt.cli.commands.{args.command}")
    command.run(args)


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (a scheduler or ``kill``) like Ctrl-C: clean up temporary outputs, keep checkpoints, exit 130."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextmanager
def data_dir_setting(data_dir: str | None) -> Iterator[None]:
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


if __name__ == "__main__":
    sys.exit(main())
