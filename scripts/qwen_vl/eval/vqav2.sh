#!/usr/bin/env bash
# Qwen-VL-7B: VQAv2 test-dev: answers converted for the EvalAI server (the score comes back from there).
# The v1.5 pipeline with Qwen-VL's defaults (_env.sh); the budget is visual tokens per image of 256 (docs/qwen_vl.md).
# Usage: bash scripts/qwen_vl/eval/vqav2.sh METHOD [BUDGET]      e.g.  vqav2.sh vispruner 128  |  vqav2.sh fastv 128  |  vqav2.sh none
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/vqav2.sh" "$@"
