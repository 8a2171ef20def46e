#!/usr/bin/env bash
# The vLLM serving tests (tests/serving/): vLLM's CPU engine in .venv-vllm, against this project's transformers
# path in .venv. Not part of scripts/test.sh (CI's command): setting up .venv-vllm downloads about 3.5 GB and takes
# about 6.5 minutes on a fresh 2-core machine, beyond the suite's 10-minute budget (docs/serving.md).
# The plugin's vLLM-free parts (entry point, wrapper) are tested by the default suite (tests/test_vllm_plugin.py).
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_vllm_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests/serving "$@"
