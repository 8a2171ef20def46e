#!/usr/bin/env bash
# LLaVA-NeXT (v1.6): MMBench-CN: as mmbench.sh on the Chinese split, with the Chinese letter hint.
# The v1.5 pipeline with NeXT defaults: MODEL_PATH liuhaotian/llava-v1.6-vicuna-7b and the NeXT budgets
# (BUDGET 640 / 320 / 160 visual tokens over the 5 anyres crops -> VisionZip (108,20) / (54,10) / (27,5) per crop).
# Usage: bash scripts/v1_6/eval/mmbench_cn.sh METHOD [BUDGET]      e.g.  mmbench_cn.sh visionzip 160  |  mmbench_cn.sh none
export MODEL_FAMILY=v1.6
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/mmbench_cn.sh" "$@"
