#!/usr/bin/env bash
# README command 2: set up the environment, then the static checks (ruff, mypy, import-linter's layers contract) and the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
VENV="${FOLDGPT_VENV:-.venv}"
"$VENV/bin/ruff" check foldgpt tests benchmarks research
"$VENV/bin/mypy" foldgpt
"$VENV/bin/lint-imports" --no-cache
exec "$VENV/bin/python" -m pytest "$@"
