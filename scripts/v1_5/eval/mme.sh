#!/usr/bin/env bash
# MME: perception and cognition scores (acc + acc+ per subtask); table: perception + cognition.
# Usage: bash scripts/v1_5/eval/mme.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/MME
ANSWERS=$D/answers/$RUN_DIR
generate_answers vqa "$D/llava_mme.jsonl" "$D/MME_Benchmark_release_version" "$ANSWERS"
"$PYTHON" -m llava.eval.evaluate mme \
    --gt-dir "$D/MME_Benchmark_release_version" \
    --question-file "$D/llava_mme.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$RESULT_DIR/mme.json"
