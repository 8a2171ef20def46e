#!/usr/bin/env bash
# Qwen-VL-7B: TextVQA val (with OCR tokens in the prompt, as LLaVA): VQA accuracy.
# The v1.5 pipeline with Qwen-VL's defaults (_env.sh); the budget is visual tokens per image of 256 (docs/qwen_vl.md).
# Usage: bash scripts/qwen_vl/eval/textvqa.sh METHOD [BUDGET]      e.g.  textvqa.sh vispruner 128  |  textvqa.sh fastv 128  |  textvqa.sh none
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/textvqa.sh" "$@"
