#!/usr/bin/env bash
# Sourced by the launchers in this folder: one place for the DeepSpeed launch line.
#   HOSTFILE     multi-node: an MPI-style hostfile ("node-1 slots=8" per line, see hostfile.example);
#                empty = one node with NUM_GPUS processes
#   NUM_GPUS     processes per node (default 8)
#   MASTER_PORT  rendezvous port (default 29500)
#   DEEPSPEED    the launcher executable (default: deepspeed on PATH)
#   DRY_RUN=1    print the command instead of running it
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
DS_CONFIGS="$ROOT/configs/deepspeed"

launch_training() {
    local cmd=("${DEEPSPEED:-deepspeed}")
    if [[ -n "${HOSTFILE:-}" ]]; then
        if [[ ! -f "$HOSTFILE" ]]; then
            echo "HOSTFILE=$HOSTFILE does not exist" >&2
            return 2
        fi
        cmd+=(--hostfile "$HOSTFILE")
    else
        cmd+=(--num_gpus "${NUM_GPUS:-8}")
    fi
    cmd+=(--master_port "${MASTER_PORT:-29500}" --module llava.train.train "$@")
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "${cmd[@]}"
        echo
    else
        cd "$ROOT"
        "${cmd[@]}"
    fi
}

# checkpoints of the two LLaVA-1.5 sizes
select_model_size() {
    case "$1" in
        7b)  LLAVA_CKPT=liuhaotian/llava-v1.5-7b;  VICUNA=lmsys/vicuna-7b-v1.5
             STAGE1_NAME=llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 ;;
        13b) LLAVA_CKPT=liuhaotian/llava-v1.5-13b; VICUNA=lmsys/vicuna-13b-v1.5
             STAGE1_NAME=llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5 ;;
        *)   echo "MODEL_SIZE must be 7b or 13b, got '$1'" >&2; return 2 ;;
    esac
}

# check_budget BUDGET: a positive number of visual tokens per image (the paper's are 64, 128, 192).
# Sets COMPRESSION (default METHOD:BUDGET, METHOD default visionzip) unless the caller set it: any spec
# ``METHOD:TOKENS`` or ``METHOD:key=value,...`` of a registered method.
check_budget() {
    case "$1" in
        ''|*[!0-9]*|0) echo "BUDGET must be a positive number of visual tokens per image (e.g. 64, 128, 192), got '$1'" >&2
           return 2 ;;
    esac
    COMPRESSION=${COMPRESSION:-${METHOD:-visionzip}:$1}
}
