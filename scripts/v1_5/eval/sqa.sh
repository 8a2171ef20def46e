#!/usr/bin/env bash
# ScienceQA test: accuracy and IMG accuracy (table: SQA-IMG).
# Usage: bash scripts/v1_5/eval/sqa.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/scienceqa
ANSWERS=$D/answers/$RUN_DIR
generate_answers science "$D/llava_test_CQM-A.json" "$D/images/test" "$ANSWERS" --single-pred-prompt
"$PYTHON" -m llava.eval.evaluate sqa \
    --base-dir "$D" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$RESULT_DIR/sqa.json"
