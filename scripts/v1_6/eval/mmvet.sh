#!/usr/bin/env bash
# LLaVA-NeXT (v1.6): MM-Vet: free-form answers converted for MM-Vet's GPT-4 grader (an external judge: API key, not run here).
# The v1.5 pipeline with NeXT defaults: MODEL_PATH liuhaotian/llava-v1.6-vicuna-7b and the NeXT budgets
# (BUDGET 640 / 320 / 160 visual tokens over the 5 anyres crops -> VisionZip (108,20) / (54,10) / (27,5) per crop).
# Usage: bash scripts/v1_6/eval/mmvet.sh METHOD [BUDGET]      e.g.  mmvet.sh visionzip 160  |  mmvet.sh none
export MODEL_FAMILY=v1.6
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/mmvet.sh" "$@"
