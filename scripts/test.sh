#!/usr/bin/env bash
# Run the whole test suite (sets up .venv and .venv-lmms first if needed). Extra arguments go to pytest.
# The suite runs on TEST_WORKERS pytest-xdist workers (default 2: CI's 2 cores; 0 runs it in this process),
# one test module per worker at a time (--dist loadfile: a module's fixtures are built once); each worker
# takes its share of the cores as torch threads (tests/conftest.py). See docs/architecture.md, "Test time".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh"
# lmms-eval lives in its own venv (.venv-lmms; its pins clash with .venv); tests/test_lmms_eval_plugin.py
# runs it. A failed setup does not stop the suite: that test then fails, naming the missing environment.
bash "$ROOT/scripts/setup_lmms_env.sh" || echo "[test] lmms-eval environment setup failed (see above)" >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
