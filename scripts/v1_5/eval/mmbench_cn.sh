#!/usr/bin/env bash
# MMBench-CN: as mmbench.sh on the Chinese split, with the Chinese letter hint.
# Usage: bash scripts/v1_5/eval/mmbench_cn.sh METHOD [BUDGET]
SPLIT=${SPLIT:-mmbench_dev_cn_20231003} LANG_HINT=cn BENCH_NAME=mmbench_cn \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/mmbench.sh" "$@"
