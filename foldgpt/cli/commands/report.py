"""``foldgpt report``: compare runs and evaluations side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from foldgpt.core.outputs import check_output_free
from foldgpt.workflows.report import collect_rows, report_table, write_report


def run(args: argparse.Namespace) -> None:
    check_output_free(Path(args.out), args.overwrite)
    write_report(args.inputs, args.out, overwrite=args.overwrite)
    header, cells = report_table(collect_rows([Path(source) for source in args.inputs]))
    widths = [max(len(header[i]), *(len(line[i]) for line in cells)) for i in range(len(header))]
    for line in [header, *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    print(f"wrote {args.out}/report.md and report.json")
