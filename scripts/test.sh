#!/usr/bin/env bash
# Run the whole test suite (sets up .venv, .venv-lmms and .venv-vllm if needed). Extra arguments go to pytest.
# The suite runs on TEST_WORKERS pytest-xdist workers (default 2: CI's 2 cores; 0 runs it in this process),
# one test module per worker at a time (--dist loadfile: a module's fixtures are built once); each worker
# takes its share of the cores as torch threads (tests/conftest.py). See docs/architecture.md, "Test time".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# Bytecode caches are written (Python's default), even where PYTHONDONTWRITEBYTECODE is set: uv installs
# .venv-vllm and .venv-lmms without .pyc files, so without it every vLLM / lmms-eval process compiles what it
# imports again (vLLM: 22 CPU-s per process instead of 11; the serving tests start three such processes).
unset PYTHONDONTWRITEBYTECODE
cd "$ROOT"
# The vLLM serving tests (tests/serving/: vLLM's CPU engine in .venv-vllm, docs/serving.md) run beside the main
# suite: their environment is set up in the background (about a minute with uv) from the start, as it does not
# depend on .venv (both install with uv, from one package cache), and the tests start in one more
# pytest process once both environments are ready. A failed setup fails the run (its log is printed), it is not
# a skip. They run with the full suite (no arguments); SERVING_TESTS=1 runs them with arguments too,
# SERVING_TESTS=0 never.
serving="${SERVING_TESTS:-$([ $# -eq 0 ] && echo 1 || echo 0)}"
if [ "$serving" = 1 ]; then
  serving_dir="$(mktemp -d)"
  (
    if ! bash "$ROOT/scripts/setup_vllm_env.sh" > "$serving_dir/setup.log" 2>&1; then
      echo setup > "$serving_dir/failed"; exit 1
    fi
    # the tests run in .venv: wait for setup_env.sh below (or for this script's end, where that failed)
    until [ -f "$serving_dir/venv-ready" ]; do kill -0 $$ 2>/dev/null || exit 1; sleep 1; done
    OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -p no:cacheprovider --basetemp "$serving_dir/tmp" tests/serving \
      > "$serving_dir/tests.log" 2>&1 || { echo tests > "$serving_dir/failed"; exit 1; }
  ) &
  serving_pid=$!
fi
bash "$ROOT/scripts/setup_env.sh"
if [ "$serving" = 1 ]; then touch "$serving_dir/venv-ready"; fi
# lmms-eval lives in its own venv (.venv-lmms; its pins clash with .venv); tests/test_lmms_eval_plugin.py
# runs it. A failed setup does not stop the suite: that test then fails, naming the missing environment.
# With the full suite (no arguments) the environment is set up in the background while the suite runs and the
# module runs in its own pytest process once it is ready (its log printed at the end); with arguments, first.
main_args=()
lmms_dir=""
if [ $# -eq 0 ]; then
  lmms_dir="$(mktemp -d)"
  (
    bash "$ROOT/scripts/setup_lmms_env.sh" > "$lmms_dir/setup.log" 2>&1 \
      || echo "[test] lmms-eval environment setup failed (see above)" >> "$lmms_dir/setup.log"
    OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -p no:cacheprovider --basetemp "$lmms_dir/tmp" \
      tests/test_lmms_eval_plugin.py > "$lmms_dir/tests.log" 2>&1 || echo tests > "$lmms_dir/failed"
  ) &
  lmms_pid=$!
  main_args=(--ignore tests/test_lmms_eval_plugin.py)
else
  bash "$ROOT/scripts/setup_lmms_env.sh" || echo "[test] lmms-eval environment setup failed (see above)" >&2
fi
status=0
"$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "${main_args[@]}" "$@" || status=$?
if [ -n "$lmms_dir" ]; then
  wait "$lmms_pid" || true
  echo "[test] lmms-eval plugin tests (tests/test_lmms_eval_plugin.py, run beside the suite):"
  cat "$lmms_dir/setup.log" "$lmms_dir/tests.log"
  [ -f "$lmms_dir/failed" ] && { echo "[test] FAILED: the lmms-eval plugin tests" >&2; status=1; }
  rm -rf "$lmms_dir"
fi
if [ "$serving" = 1 ]; then
  wait "$serving_pid" || true
  if [ "$(cat "$serving_dir/failed" 2>/dev/null)" = setup ]; then
    cat "$serving_dir/setup.log"
    echo "[test] FAILED: the vLLM environment setup (scripts/setup_vllm_env.sh) failed, see above; the serving" \
      "tests (tests/serving/) did not run" >&2
    status=1
  else
    echo "[test] vLLM serving tests (tests/serving/, run beside the suite):"
    cat "$serving_dir/tests.log"
    [ -f "$serving_dir/failed" ] && { echo "[test] FAILED: the vLLM serving tests" >&2; status=1; }
  fi
  rm -rf "$serving_dir"
fi
exit "$status"
