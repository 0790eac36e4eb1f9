#!/usr/bin/env bash
# README command 2: set up the environment, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec "${FOLDGPT_VENV:-.venv}/bin/python" -m pytest "$@"
