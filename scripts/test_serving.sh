#!/usr/bin/env bash
# The vLLM serving tests (tests/serving/) alone: vLLM's CPU engine in .venv-vllm, against this project's
# transformers path in .venv. scripts/test.sh (CI's command) runs them too, beside the main suite; this runs only
# them (e.g. after a change to visionzip/vllm/). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_vllm_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests/serving "$@"
