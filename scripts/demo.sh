#!/usr/bin/env bash
# The main job on the embedded default: builds a tiny model locally (once, deterministically) and
# trains the toy LLaVA once (cached) and measures accuracy against visual tokens for every method.
# Sets up .venv first if needed. Extra arguments go to llava.demo (the toy study).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
exec "$VENV/bin/python" -m llava.demo "$@"
