#!/usr/bin/env bash
# SEED-Bench: accuracy (image, video frames, all; table: all).
# Usage: bash scripts/v1_5/eval/seed.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/seed_bench
ANSWERS=$D/answers/$RUN_DIR
generate_answers vqa "$D/llava-seed-bench.jsonl" "$D" "$ANSWERS"
"$PYTHON" -m llava.eval.evaluate seed \
    --annotation-file "$D/SEED-Bench.json" \
    --question-file "$D/llava-seed-bench.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$RESULT_DIR/seed.json"
