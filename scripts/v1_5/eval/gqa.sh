#!/usr/bin/env bash
# GQA testdev-balanced: exact-match accuracy (also writes the official eval.py predictions file).
# Usage: bash scripts/v1_5/eval/gqa.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
SPLIT=llava_gqa_testdev_balanced
D=$EVAL_DIR/gqa
ANSWERS=$D/answers/$SPLIT/$RUN_DIR
generate_answers vqa "$D/$SPLIT.jsonl" "$D/data/images" "$ANSWERS"
"$PYTHON" -m llava.eval.convert gqa-predictions --result-file "$ANSWERS/merge.jsonl" \
    --output "$ANSWERS/testdev_balanced_predictions.json"
"$PYTHON" -m llava.eval.evaluate gqa \
    --annotation-file "$D/data/testdev_balanced_questions.json" \
    --question-file "$D/$SPLIT.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$RESULT_DIR/gqa.json"
