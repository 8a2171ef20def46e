#!/usr/bin/env bash
# LLaVA-Bench (in the wild): free-form answers and one judge request per question (context, question,
# reference GPT-4 answer, model answer). The GPT judge is external (API key, not run here); put its
# reviews (one json line per question with "tuple": [reference score, model score]) at
# $EVAL_DIR/llava-bench-in-the-wild/reviews/<model>/<method>/<budget>/reviews.jsonl and run this again.
# Usage: bash scripts/v1_5/eval/llavabench.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
D=$EVAL_DIR/llava-bench-in-the-wild
ANSWERS=$D/answers/$RUN_DIR
REVIEWS=$D/reviews/$RUN_DIR
generate_answers vqa "$D/questions.jsonl" "$D/images" "$ANSWERS" --max_new_tokens 1024
"$PYTHON" -m llava.eval.convert llavabench-judge \
    --question-file "$D/questions.jsonl" \
    --context-file "$D/context.jsonl" \
    --reference-file "$D/answers_gpt4.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$REVIEWS/judge_input.jsonl"
if [ -f "$REVIEWS/reviews.jsonl" ]; then
    "$PYTHON" -m llava.eval.evaluate llavabench --review-file "$REVIEWS/reviews.jsonl" \
        --question-file "$D/questions.jsonl" --output "$RESULT_DIR/llavabench.json"
else
    echo "-> have a GPT judge score $REVIEWS/judge_input.jsonl into $REVIEWS/reviews.jsonl, then run this again"
fi
