#!/usr/bin/env bash
# The main job on the embedded default: trains the toy LLaVA once (cached; a contrastively trained tower,
# LLaVA's stages 1 and 2, and the same on a random tower) and measures [CLS] attention concentration and
# accuracy against visual tokens for every method on both towers (docs/toy_task.md).
# Sets up .venv first if needed. Extra arguments go to llava.demo (the toy study).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
exec "$VENV/bin/python" -m llava.demo "$@"
