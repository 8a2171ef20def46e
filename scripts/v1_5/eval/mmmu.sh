#!/usr/bin/env bash
# MMMU validation: accuracy (multiple-choice by letter, open questions by answer matching).
# The question file comes from `python -m llava.eval.prepare_mmmu` (see docs/evaluation.md).
# Usage: bash scripts/v1_5/eval/mmmu.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/MMMU
ANSWERS=$D/answers/$RUN_DIR
generate_answers mmmu "$D/llava_mmmu_val.jsonl" "$D/images" "$ANSWERS"
"$PYTHON" -m llava.eval.evaluate mmmu \
    --question-file "$D/llava_mmmu_val.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$RESULT_DIR/mmmu.json"
