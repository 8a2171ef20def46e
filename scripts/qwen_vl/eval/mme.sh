#!/usr/bin/env bash
# Qwen-VL-7B: MME: perception and cognition scores (acc + acc+ per subtask); table: perception + cognition.
# The v1.5 pipeline with Qwen-VL's defaults (_env.sh); the budget is visual tokens per image of 256 (docs/qwen_vl.md).
# Usage: bash scripts/qwen_vl/eval/mme.sh METHOD [BUDGET]      e.g.  mme.sh vispruner 128  |  mme.sh fastv 128  |  mme.sh none
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/mme.sh" "$@"
