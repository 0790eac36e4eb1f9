#!/usr/bin/env bash
# README command 1: set up the environment, then run the main job on the bundled SmolLM2-135M.
# Extra arguments go to `foldgpt compress` (see `.venv/bin/foldgpt compress --help`). A rerun resumes runs/main,
# skipping the stages that finished; pass --overwrite to start from scratch.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec "${FOLDGPT_VENV:-.venv}/bin/foldgpt" compress smollm2-135m --out runs/main "$@"
