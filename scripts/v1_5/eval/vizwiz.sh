#!/usr/bin/env bash
# VizWiz test: answers converted for the EvalAI server (the score comes back from there).
# Usage: bash scripts/v1_5/eval/vizwiz.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/vizwiz
ANSWERS=$D/answers/$RUN_DIR
UPLOAD=$D/answers_upload/$RUN_DIR/$CKPT.json
generate_answers vqa "$D/llava_test.jsonl" "$D/test" "$ANSWERS"
"$PYTHON" -m llava.eval.convert vizwiz \
    --question-file "$D/llava_test.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$UPLOAD"
note_external vizwiz "upload $UPLOAD to EvalAI (VizWiz VQA, test-dev phase)" "$ANSWERS"
