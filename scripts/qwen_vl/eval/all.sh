#!/usr/bin/env bash
# VisPruner Table 4's benchmarks for Qwen-VL-7B (VQAv2, GQA, VizWiz, SQA-IMG, TextVQA) for one setting, then the report.
# Usage: bash scripts/qwen_vl/eval/all.sh METHOD [BUDGET]      (the paper: none | vispruner 128 | fastv 128;
#        BENCHMARKS="gqa textvqa" to choose; pope and mme run too when named)
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
for bench in ${BENCHMARKS:-vqav2 gqa vizwiz sqa textvqa}; do
    echo "=== $bench ==="
    bash "$HERE/$bench.sh" "$@"
done
EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
"${PYTHON:-python}" -m llava.eval.report --results-dir "${RESULTS_DIR:-$EVAL_DIR/results}" \
    --out-dir "${REPORT_DIR:-$EVAL_DIR/report}"
