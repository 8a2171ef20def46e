#!/usr/bin/env bash
# MMBench: circular accuracy on a dev split (local) and the server's xlsx for any split.
# Usage: bash scripts/v1_5/eval/mmbench.sh METHOD [BUDGET]
#   SPLIT (default mmbench_dev_20230712; mmbench_test_en_20231003 for the test server)
#   ALL_ROUNDS=1 asks every question once per option with rotated options (circular evaluation even
#   without the tsv's own circular copies); LANG_HINT=cn for the Chinese letter hint (mmbench_cn.sh).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
SPLIT=${SPLIT:-mmbench_dev_20230712}
NAME=${BENCH_NAME:-mmbench}
D=$EVAL_DIR/mmbench
ANSWERS=$D/answers/$SPLIT/$RUN_DIR
EXTRA=(--single-pred-prompt --lang "${LANG_HINT:-en}")
[ "${ALL_ROUNDS:-0}" = "1" ] && EXTRA+=(--all-rounds)
generate_answers mmbench "$D/$SPLIT.tsv" "" "$ANSWERS" "${EXTRA[@]}"
"$PYTHON" -m llava.eval.convert mmbench-submission \
    --annotation-file "$D/$SPLIT.tsv" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$D/answers_upload/$SPLIT/$RUN_DIR/$CKPT.xlsx"
if head -n 1 "$D/$SPLIT.tsv" | tr '\t' '\n' | grep -qx answer; then
    "$PYTHON" -m llava.eval.evaluate mmbench --name "$NAME" \
        --annotation-file "$D/$SPLIT.tsv" \
        --result-file "$ANSWERS/merge.jsonl" \
        --output "$RESULT_DIR/$NAME.json"
else
    note_external "$NAME" "upload $D/answers_upload/$SPLIT/$RUN_DIR/$CKPT.xlsx to the MMBench evaluation server" "$ANSWERS"
fi
