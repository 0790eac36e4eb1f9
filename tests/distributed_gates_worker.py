"""One rank of the data-parallel gate-training test (started by torchrun in tests/test_distributed_gates.py; run in the
test's folder). Runs ``foldgpt prune`` once per argument list, in one launch (process start-up is the slow part on a
loaded CPU). Usage: distributed_gates_worker.py ARGS... [--next ARGS...]...
"""

import sys

from foldgpt.cli.main import main

if __name__ == "__main__":
    runs: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "--next":
            runs.append([])
        else:
            runs[-1].append(arg)
    for argv in runs:
        assert main(argv) == 0, argv
