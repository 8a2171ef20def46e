#!/usr/bin/env bash
# POPE (adversarial / popular / random): F1, accuracy, precision, recall, yes-ratio; table: mean F1.
# Usage: bash scripts/v1_5/eval/pope.sh METHOD [BUDGET]     e.g.  pope.sh visionzip 64  |  pope.sh none
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/pope
ANSWERS=$D/answers/$RUN_DIR
generate_answers vqa "$D/llava_pope_test.jsonl" "$D/val2014" "$ANSWERS"
"$PYTHON" -m llava.eval.evaluate pope \
    --annotation-dir "$D/coco" \
    --question-file "$D/llava_pope_test.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$RESULT_DIR/pope.json"
