#!/usr/bin/env bash
# The GPU tables of docs/efficiency.md in one command (one H200-class GPU, bf16, random weights in the real
# geometries, full depth). OUT=<folder> for the markdown / JSON files (default outputs/gpu_tables).
# Each step has its own time limit so that one slow step cannot take the others with it.
set -u
OUT=${OUT:-outputs/gpu_tables}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
COMMON=(--device cuda --in-process --repeats 5 --warmup 2 --new-tokens 16)
ALL64=(none visionzip:64 vispruner:64 tome:64 prumerge:64 prumerge+:64 random:64 pooling:64 fastv:64 pdrop:64 sparsevlm:64)
step() {  # step NAME SECONDS ARGS...
    local name=$1 seconds=$2
    shift 2
    echo "=== $name"
    timeout "$seconds" "$PY" -m llava.bench "$@" --markdown "$OUT/$name.md" --json "$OUT/$name.json" 2>&1 | tail -n 40
}
# every method at 64 tokens, LLaVA-1.5-7B, batch 1 and 8 (issue: the methods table; FastV vs VisPruner)
step methods_1.5-7b "${STEP1:-200}" --geometry llava-1.5-7b "${COMMON[@]}" --batch 1 8 --methods "${ALL64[@]}"
# LLaVA-NeXT-7B at 160 (32 per view) and the 13B + VisionZip 64 vs 7B vanilla comparison
step next-7b "${STEP2:-100}" --geometry llava-next-7b "${COMMON[@]}" --batch 1 --methods none visionzip:32 vispruner:32 fastv:32
step 1.5-13b "${STEP3:-70}" --geometry llava-1.5-13b "${COMMON[@]}" --batch 1 --methods none visionzip:64
# the compiled path (static cache + CUDA graphs) beside eager
step compiled_1.5-7b "${STEP4:-200}" --geometry llava-1.5-7b "${COMMON[@]}" --batch 1 --compile --methods none visionzip:64
