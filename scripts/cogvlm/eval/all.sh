#!/usr/bin/env bash
# CogVLM (cogvlm-chat-v1.1, 17B): the benchmarks of VisPruner's Table 4 (VQAv2, GQA, VizWiz, SQA-IMG, TextVQA)
# for one setting, one after the other, then the report. Budgets of the table: none (all 1225 tokens),
# fastv 123, vispruner 123 per image. BENCHMARKS="gqa sqa" to choose; any other benchmark of
# scripts/v1_5/eval/ (pope, mme, mmbench, ...) runs the same way on CogVLM.
# MODEL_PATH: a local copy of THUDM/cogvlm-chat-hf with Vicuna-7B-v1.5's tokenizer files copied in (docs/cogvlm.md).
# Usage: bash scripts/cogvlm/eval/all.sh METHOD [BUDGET]      e.g.  all.sh vispruner 123  |  all.sh none
export MODEL_PATH=${MODEL_PATH:-THUDM/cogvlm-chat-hf}
export MODEL_FAMILY=cogvlm
export CONV_MODE=${CONV_MODE-}  # empty: the checkpoint's own template
export BENCHMARKS=${BENCHMARKS:-vqav2 gqa vizwiz sqa textvqa}
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/all.sh" "$@"
