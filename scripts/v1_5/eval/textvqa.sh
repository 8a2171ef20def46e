#!/usr/bin/env bash
# TextVQA val (with OCR tokens in the prompt, as LLaVA): VQA accuracy.
# Usage: bash scripts/v1_5/eval/textvqa.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/textvqa
ANSWERS=$D/answers/$RUN_DIR
generate_answers vqa "$D/llava_textvqa_val_v051_ocr.jsonl" "$D/train_images" "$ANSWERS"
"$PYTHON" -m llava.eval.evaluate textvqa \
    --annotation-file "$D/TextVQA_0.5.1_val.json" \
    --question-file "$D/llava_textvqa_val_v051_ocr.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$RESULT_DIR/textvqa.json"
