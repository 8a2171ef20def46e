#!/usr/bin/env bash
# MM-Vet: free-form answers converted for MM-Vet's GPT-4 grader (an external judge: API key, not run here).
# Usage: bash scripts/v1_5/eval/mmvet.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/mm-vet
ANSWERS=$D/answers/$RUN_DIR
generate_answers vqa "$D/llava-mm-vet.jsonl" "$D/images" "$ANSWERS" --max_new_tokens 1024
"$PYTHON" -m llava.eval.convert mmvet --result-file "$ANSWERS/merge.jsonl" \
    --output "$D/results/$RUN_DIR/$CKPT.json"
note_external mmvet "grade $D/results/$RUN_DIR/$CKPT.json with MM-Vet's GPT-4 grader (see docs/evaluation.md)" "$ANSWERS"
