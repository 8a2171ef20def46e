#!/usr/bin/env bash
# Qwen-VL-7B: ScienceQA test: accuracy and IMG accuracy (table: SQA-IMG).
# The v1.5 pipeline with Qwen-VL's defaults (_env.sh); the budget is visual tokens per image of 256 (docs/qwen_vl.md).
# Usage: bash scripts/qwen_vl/eval/sqa.sh METHOD [BUDGET]      e.g.  sqa.sh vispruner 128  |  sqa.sh fastv 128  |  sqa.sh none
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/sqa.sh" "$@"
