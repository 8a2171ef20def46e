#!/usr/bin/env bash
# Qwen-VL-7B: POPE (adversarial / popular / random): F1, accuracy, precision, recall, yes-ratio; table: mean F1.
# The v1.5 pipeline with Qwen-VL's defaults (_env.sh); the budget is visual tokens per image of 256 (docs/qwen_vl.md).
# Usage: bash scripts/qwen_vl/eval/pope.sh METHOD [BUDGET]      e.g.  pope.sh vispruner 128  |  pope.sh fastv 128  |  pope.sh none
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/pope.sh" "$@"
