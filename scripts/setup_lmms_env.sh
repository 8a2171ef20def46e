#!/usr/bin/env bash
# Create the lmms-eval environment (once): a separate virtual environment with lmms-eval and this project.
#
# lmms-eval 0.7.3 pins wandb==0.25.0 and pulls sentence-transformers, opencv, openai and more, which clash
# with the training environment (.venv); so it gets its own venv, on the same torch build as .venv.
# scripts/test.sh runs this, and tests/test_lmms_eval_plugin.py uses the venv. About a minute the first time.
#
#   LMMS_VENV=/path/to/venv   where to put it (default: .venv-lmms in the repository)
#   LMMS_EVAL_VERSION=0.7.3   lmms-eval release to install
#   TORCH_VERSION=2.x.y       torch to install when the venv has none (default: the torch of .venv, or $VENV, if
#                             there is one, else 2.13.0); torch is pinned so the installer never swaps the build.
#   UV_VERSION=0.13.9         uv release used to install it (as scripts/setup_vllm_env.sh)
# Idempotent: returns at once when the venv already holds the wanted versions of everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LMMS_VENV="${LMMS_VENV:-$ROOT/.venv-lmms}"
LMMS_EVAL_VERSION="${LMMS_EVAL_VERSION:-0.7.3}"
TRAIN_VENV="${VENV:-$ROOT/.venv}"  # the training environment, whose torch build is reused
UV_VERSION="${UV_VERSION:-0.13.9}"
stamp="$LMMS_VENV/.visionzip-lmms-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/scripts/setup_lmms_env.sh" | sha256sum | cut -d' ' -f1)-lmms-eval-$LMMS_EVAL_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && "$LMMS_VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('lmms_eval', 'llava', 'visionzip'))))" 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
if [ -z "${TORCH_VERSION:-}" ] && [ -x "$TRAIN_VENV/bin/python" ]; then
  TORCH_VERSION="$("$TRAIN_VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
fi
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ ! -x "$LMMS_VENV/bin/python" ]; then
  echo "[setup-lmms] creating virtual environment in $LMMS_VENV"
  "${PYTHON:-python3}" -m venv "$LMMS_VENV"
fi
# Installed with uv, as .venv-vllm is (scripts/setup_vllm_env.sh: parallel downloads, files linked from uv's
# cache, no bytecode compilation; the torch wheel the two environments share is unpacked into the cache once):
# with empty caches, on the same busy 2-core machine, 47 s and 31 CPU-s against 405 s and 136 CPU-s with pip
# (the same versions of every package). The first lmms-eval process then compiles what it imports (about
# 20 CPU-s; scripts/test.sh lets it write the .pyc files). uv does not read pip's configuration: the sources
# pip is configured with are passed on (scripts/uv_install.sh).
source "$ROOT/scripts/uv_install.sh"
use_uv "$LMMS_VENV" setup-lmms
if ! "$LMMS_VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup-lmms] installing torch==$TORCH_VERSION"
  # a local build label (2.13.0+cpu) is found only where such wheels are at hand; else the plain release
  uv_install "torch==$TORCH_VERSION" 2>/dev/null || uv_install "torch==${TORCH_VERSION%%+*}"
fi
torch_version="$("$LMMS_VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
# Pin torch to the installed build: without it a dependency could pull another torch (GBs of CUDA wheels).
echo "torch==$torch_version" > "$LMMS_VENV/constraints.txt"
# lmms-eval pins wandb==0.25.0, which needs protobuf<7; sentencepiece 0.2.3's generated protobuf module
# refuses a protobuf runtime older than 7.36 (VersionError when the LLaVA tokenizer loads), 0.2.1's does not.
echo "sentencepiece==0.2.1" >> "$LMMS_VENV/constraints.txt"
# lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4 removed.
echo "filelock<4" >> "$LMMS_VENV/constraints.txt"
# lmms-eval declares torchvision (and timm, which needs it), but its core (CLI, evaluator, task loading, the
# registry) never imports them; only some of its own model classes do. The package index's torchvision
# wheels for Linux are CUDA builds: against a CPU-only torch their _C.so does not load and
# `import torchvision` raises ("operator torchvision::nms does not exist"), which would also break
# transformers (it imports torchvision whenever the package is installed). So on a CPU-only torch,
# lmms-eval is installed without those two (a requirement whose marker is never true removes the package from
# the resolution, uv's documented way); with a CUDA torch, with everything it declares.
cuda="$("$LMMS_VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
: > "$LMMS_VENV/overrides.txt"
if [ -z "$cuda" ]; then
  printf '%s\n' 'torchvision; sys_platform == "never"' 'timm; sys_platform == "never"' > "$LMMS_VENV/overrides.txt"
fi
echo "[setup-lmms] installing lmms-eval==$LMMS_EVAL_VERSION and visionzip-llava (torch pinned to $torch_version)"
uv_install --constraint "$LMMS_VENV/constraints.txt" --override "$LMMS_VENV/overrides.txt" \
  "lmms-eval==$LMMS_EVAL_VERSION" -e "$ROOT"
if [ -z "$cuda" ] && ! "$LMMS_VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  # a torchvision left from an earlier install would break transformers' imports (see above)
  "$LMMS_VENV/bin/python" -m uv pip uninstall --quiet --python "$LMMS_VENV/bin/python" torchvision timm 2>/dev/null || true
fi
"$LMMS_VENV/bin/python" -c "import lmms_eval.models as m; assert 'visionzip_llava' in m.list_available_models()" \
  || { echo "[setup-lmms] lmms-eval does not list visionzip_llava: the entry point is missing" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup-lmms] done in $(( $(date +%s) - start )) s"
