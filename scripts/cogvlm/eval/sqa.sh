#!/usr/bin/env bash
# CogVLM (cogvlm-chat-v1.1, 17B): ScienceQA test: accuracy and IMG accuracy (table: SQA-IMG).
# The v1.5 pipeline (one view per image) on the natively implemented CogVLM (docs/cogvlm.md), with the budgets
# of VisPruner's Table 4: none (all 1225 tokens), fastv 123, vispruner 123 (10 % kept) per image.
# MODEL_PATH: a local copy of THUDM/cogvlm-chat-hf with Vicuna-7B-v1.5's tokenizer files copied in (the hub
# repository ships none); the prompt is the checkpoint's ("Question: {q} Answer:"), CONV_MODE does not apply.
# Usage: bash scripts/cogvlm/eval/sqa.sh METHOD [BUDGET]      e.g.  sqa.sh vispruner 123  |  sqa.sh fastv 123  |  sqa.sh none
export MODEL_PATH=${MODEL_PATH:-THUDM/cogvlm-chat-hf}
export MODEL_FAMILY=cogvlm
export CONV_MODE=${CONV_MODE-}  # empty: the checkpoint's own template
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/sqa.sh" "$@"
