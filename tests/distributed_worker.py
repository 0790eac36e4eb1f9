"""One rank of the data-parallel test (started by torchrun in tests/test_distributed.py; run in the test's folder).

Heals the same student three ways in one launch (process start-up is the slow part on a loaded CPU): through the CLI
(``two/``), and through the API interrupted after ``STOP`` steps with a checkpoint, then resumed (``resumed/``).
Usage: distributed_worker.py STOP -- CLI_HEAL_ARGS...
"""

import sys

from foldgpt.cli.commands.heal import heal_config
from foldgpt.cli.main import build_parser, main
from foldgpt.formats.loading import load_model
from foldgpt.healing.loop import heal


def api_heal(argv: list[str], **kwargs):
    args = build_parser().parse_args(argv)
    student, teacher = load_model(args.student), load_model(args.teacher)
    return heal(student, teacher, heal_config(args), out=args.out, **kwargs)


if __name__ == "__main__":
    stop, heal_args = int(sys.argv[1]), sys.argv[3:]
    assert main([*heal_args, "--out", "two"]) == 0
    first = api_heal([*heal_args, "--out", "resumed"], checkpoint_dir="resumed.checkpoint", stop_after_steps=stop)
    assert not first.completed and len(first.history) == stop
    resumed = api_heal([*heal_args, "--out", "resumed"], resume=True)
    assert resumed.completed and resumed.metadata["resumed_from_step"] == stop
