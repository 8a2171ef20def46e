#!/usr/bin/env bash
# Mini-Gemini (MGM-7B / 13B): VizWiz test: answers converted for the EvalAI server (the score comes back from there).
# The v1.5 pipeline with MGM defaults: MODEL_PATH YanweiLi/MGM-7B (MGM-13B: MODEL_PATH=YanweiLi/MGM-13B), vicuna_v1,
# and the paper's MGM budgets (VisionZip Table 8: BUDGET 192 / 128 / 64 -> (162,30) / (108,20) / (54,10) per image,
# on the 576 LR tokens; the HR tower and patch-info mining run on the kept tokens: docs/mgm.md).
# Usage: bash scripts/mgm/eval/vizwiz.sh METHOD [BUDGET]      e.g.  vizwiz.sh visionzip 64  |  vizwiz.sh none
export MODEL_PATH=${MODEL_PATH:-YanweiLi/MGM-7B}
export MODEL_FAMILY=v1.5
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/vizwiz.sh" "$@"
