#!/usr/bin/env bash
# The GPU tables of docs/efficiency.md in one command (one H200-class GPU, bf16, random weights in the real
# geometries, full depth). OUT=<folder> for the markdown / JSON files (default outputs/gpu_tables).
# Each step has its own time limit so that one slow step cannot take the others with it.
# SMOKE=1: the same steps on the CPU in the tiny geometries (2 LLM layers, 1 repeat, aot_eager compile,
# in-LLM methods with schedules that fit 2 layers): checks the script end to end without a GPU; its
# figures mean nothing.
set -u
OUT=${OUT:-outputs/gpu_tables}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# every registered method (visionzip.registered_methods(): a new file in visionzip/methods/ joins the tables
# by itself) at 64 tokens per image; SPEC_OVERRIDE[method] replaces its METHOD:64 where a run needs another spec
REGISTERED=$("$PY" -c "import visionzip; print(' '.join(visionzip.registered_methods()))") || exit 2
declare -A SPEC_OVERRIDE=()
registered_at_64() { local m; for m in $REGISTERED; do echo "${SPEC_OVERRIDE[$m]:-$m:64}"; done; }
if [ "${SMOKE:-0}" = 1 ]; then
    COMMON=(--device cpu --in-process --repeats 1 --warmup 0 --new-tokens 2)
    COMPILE=(--compile --compile-backend aot_eager)
    G15=tiny G13=tiny GNEXT=tiny-next
    # the paper schedules of these in-LLM methods need more than the tiny geometry's 2 layers
    SPEC_OVERRIDE=([fastv]=fastv:tokens=64,layer=1 [pdrop]=pdrop:layers=1,ratios=0.5
                   [sparsevlm]=sparsevlm:layers=0,counts=64)
    NEXT=(none visionzip:32 vispruner:32 fastv:32,1)
    BATCHES=(1 2)
    FASTV=fastv:64,1
else
    COMMON=(--device cuda --in-process --repeats 5 --warmup 2 --new-tokens 16)
    COMPILE=(--compile)
    G15=llava-1.5-7b G13=llava-1.5-13b GNEXT=llava-next-7b
    NEXT=(none visionzip:32 vispruner:32 fastv:32)
    BATCHES=(1 8)
    FASTV=fastv:64
fi
mapfile -t ALL64 < <(registered_at_64)
ALL64=(none "${ALL64[@]}")
FAILED=0
step() {  # step NAME SECONDS ARGS... (MODULE=llava.bench.prefill step ...: another bench module)
    local name=$1 seconds=$2
    shift 2
    echo "=== $name"
    timeout "$seconds" "$PY" -m "${MODULE:-llava.bench}" "$@" --markdown "$OUT/$name.md" --json "$OUT/$name.json" 2>&1 \
        | grep -v USDT | tail -n 40
    local status=${PIPESTATUS[0]}
    if [ "$status" != 0 ]; then
        echo "=== $name FAILED (exit $status; 124: its time limit of $seconds s)"
        FAILED=1
    fi
}
# every method at 64 tokens, LLaVA-1.5-7B, batch 1 and 8 (issue: the methods table; FastV vs VisPruner)
step methods_1.5-7b "${STEP1:-200}" --geometry $G15 "${COMMON[@]}" --batch "${BATCHES[@]}" --methods "${ALL64[@]}"
# LLaVA-NeXT-7B at 160 (32 per view) and the 13B + VisionZip 64 vs 7B vanilla comparison
step next-7b "${STEP2:-100}" --geometry $GNEXT "${COMMON[@]}" --batch 1 --methods "${NEXT[@]}"
step 1.5-13b "${STEP3:-70}" --geometry $G13 "${COMMON[@]}" --batch 1 --methods none visionzip:64
# the compiled path (static cache + CUDA graphs) beside eager, with the roofline; an in-LLM method gets its
# eager row only (the compiled path refuses it by name). Each +compile row also times the image path's
# stages 1-2 captured and eager, vanilla and compressed, in one run (the "image step / tower" columns: the
# issue's compression step <= 1.03x the vanilla tower at batch 1), each against the tower's roofline bound
step compiled_1.5-7b "${STEP4:-200}" --geometry $G15 "${COMMON[@]}" --batch 1 "${COMPILE[@]}" --methods none visionzip:64 $FASTV
step compiled_next-7b "${STEP5:-150}" --geometry $GNEXT "${COMMON[@]}" --batch 1 "${COMPILE[@]}" --methods none visionzip:32
# batch-1 prefill of vanilla and every method at 64, interleaved round by round in one process, with the
# selection / drop breakdown, host syncs and device operators (issue 23: no method's prefill slower than
# vanilla's; docs/efficiency.md, "Prefill at 64 tokens per method")
if [ "${SMOKE:-0}" = 1 ]; then PREFILL=(--device cpu --layers 4 --repeats 1 --warmup 0); else PREFILL=(--device cuda --repeats 10 --warmup 2); fi
MODULE=llava.bench.prefill step prefill_1.5-7b "${STEP6:-300}" --geometry $G15 "${PREFILL[@]}" --breakdown
# the other families at their real geometry, full depth (llava.bench.families: MGM-7B / 13B, Qwen-VL-7B,
# CogVLM-17B built from their own config classes): vanilla, VisionZip and VisPruner at 64 tokens per image,
# interleaved in one process (docs/efficiency.md, "Other families")
if [ "${SMOKE:-0}" = 1 ]; then
    FAMILY_RUNS=(mgm-tiny qwen-vl-tiny cogvlm-tiny) FAMILY=(--device cpu --dtype float32 --repeats 1 --warmup 0)
else
    FAMILY_RUNS=(mgm-7b mgm-13b qwen-vl-7b cogvlm-17b) FAMILY=(--device cuda --repeats 10 --warmup 2)
fi
for family in "${FAMILY_RUNS[@]}"; do
    MODULE=llava.bench.families step "family_$family" "${STEP7:-200}" --family "$family" "${FAMILY[@]}" \
        --methods none visionzip:64 vispruner:64
done
exit $FAILED
