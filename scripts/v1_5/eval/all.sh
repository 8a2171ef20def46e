#!/usr/bin/env bash
# Every benchmark of the paper's table for one setting, one after the other, then the report.
# Usage: bash scripts/v1_5/eval/all.sh METHOD [BUDGET]      (BENCHMARKS="pope gqa" to choose)
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
for bench in ${BENCHMARKS:-gqa mmbench mme pope sqa vqav2 textvqa mmmu seed mmvet llavabench}; do
    echo "=== $bench ==="
    bash "$HERE/$bench.sh" "$@"
done
EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
"${PYTHON:-python}" -m llava.eval.report --results-dir "${RESULTS_DIR:-$EVAL_DIR/results}" \
    --out-dir "${REPORT_DIR:-$EVAL_DIR/report}"
