#!/usr/bin/env bash
# Qwen-VL-7B: GQA testdev-balanced: exact-match accuracy (also writes the official eval.py predictions file).
# The v1.5 pipeline with Qwen-VL's defaults (_env.sh); the budget is visual tokens per image of 256 (docs/qwen_vl.md).
# Usage: bash scripts/qwen_vl/eval/gqa.sh METHOD [BUDGET]      e.g.  gqa.sh vispruner 128  |  gqa.sh fastv 128  |  gqa.sh none
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/gqa.sh" "$@"
