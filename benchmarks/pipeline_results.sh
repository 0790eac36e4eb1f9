#!/usr/bin/env bash
# The README's pipeline results table: dense SmolLM2-135M against FoldGPT (gates) and ShortGPT (bi) at ~25% and ~40%
# fewer parameters, each healed with the same budget, on WikiText-2, PTB and the five zero-shot tasks.
#
#   bash benchmarks/pipeline_results.sh [extra foldgpt compress options, e.g. --limit 0 --max-tokens 0 on a GPU]
#   RUNS="foldgpt-25 bi-25" bash benchmarks/pipeline_results.sh    # a subset of the runs below
#
# Every run shares the dense evaluation and the analysis (identical settings, so the stage is copied, not redone);
# runs/results/<name>/ holds each run, benchmarks/results/pipeline/ the report (report.md, report.json, figures).
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDGPT="${FOLDGPT_VENV:-.venv}/bin/foldgpt"
OUT=runs/results
mkdir -p "$OUT"
# --nsamples 8: the table in the README was measured with 8 calibration windows (compress's default until it became 64)
runs=(
  "foldgpt-25 --method gates --target-params 0.75 --nsamples 8"
  "bi-25 --method bi --target-params 0.75 --nsamples 8"
  "foldgpt-40 --method gates --target-params 0.60 --nsamples 8"
  "bi-40 --method bi --target-params 0.60 --nsamples 8"
)
first=""
done_runs=()
for run in "${runs[@]}"; do
  read -r name options <<<"$run"
  if [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]]; then continue; fi
  if [ -n "$first" ] && [ ! -d "$OUT/$name/dense" ]; then  # reuse the dense evaluation and analysis of the first run
    mkdir -p "$OUT/$name"
    cp -r "$OUT/$first/dense" "$OUT/$first/analysis" "$OUT/$first/config.yaml" "$OUT/$name/"
  fi
  # shellcheck disable=SC2086
  "$FOLDGPT" compress smollm2-135m --out "$OUT/$name" $options "$@"
  first="${first:-$name}"
  done_runs+=("$OUT/$name")
done
"$FOLDGPT" report "${done_runs[@]}" --out benchmarks/results/pipeline --overwrite
