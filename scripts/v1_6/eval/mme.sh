#!/usr/bin/env bash
# LLaVA-NeXT (v1.6): MME: perception and cognition scores (acc + acc+ per subtask); table: perception + cognition.
# The v1.5 pipeline with NeXT defaults: MODEL_PATH liuhaotian/llava-v1.6-vicuna-7b and the NeXT budgets
# (BUDGET 640 / 320 / 160 visual tokens over the 5 anyres crops -> VisionZip (108,20) / (54,10) / (27,5) per crop).
# Usage: bash scripts/v1_6/eval/mme.sh METHOD [BUDGET]      e.g.  mme.sh visionzip 160  |  mme.sh none
export MODEL_FAMILY=v1.6
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/mme.sh" "$@"
