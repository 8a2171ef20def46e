#!/usr/bin/env bash
# LLaVA-NeXT (v1.6): ScienceQA test: accuracy and IMG accuracy (table: SQA-IMG).
# The v1.5 pipeline with NeXT defaults: MODEL_PATH liuhaotian/llava-v1.6-vicuna-7b and the NeXT budgets
# (BUDGET 640 / 320 / 160 visual tokens over the 5 anyres crops -> VisionZip (108,20) / (54,10) / (27,5) per crop).
# Usage: bash scripts/v1_6/eval/sqa.sh METHOD [BUDGET]      e.g.  sqa.sh visionzip 160  |  sqa.sh none
export MODEL_FAMILY=v1.6
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/sqa.sh" "$@"
