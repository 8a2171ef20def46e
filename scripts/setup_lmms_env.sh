#!/usr/bin/env bash
# Create the lmms-eval environment (once): a separate virtual environment with lmms-eval and this project.
#
# lmms-eval 0.7.3 pins wandb==0.25.0 and pulls sentence-transformers, opencv, openai and more, which clash
# with the training environment (.venv); so it gets its own venv, on the same torch build as .venv.
# scripts/test.sh runs this, and tests/test_lmms_eval_plugin.py uses the venv. About 3 minutes the first time.
#
#   LMMS_VENV=/path/to/venv   where to put it (default: .venv-lmms in the repository)
#   LMMS_EVAL_VERSION=0.7.3   lmms-eval release to install
#   TORCH_VERSION=2.x.y       torch to install when the venv has none (default: the torch of .venv, or $VENV, if
#                             there is one, else 2.13.0); torch is pinned so pip never swaps the build.
# Idempotent: returns at once when the venv already holds the wanted versions of everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LMMS_VENV="${LMMS_VENV:-$ROOT/.venv-lmms}"
LMMS_EVAL_VERSION="${LMMS_EVAL_VERSION:-0.7.3}"
TRAIN_VENV="${VENV:-$ROOT/.venv}"  # the training environment, whose torch build is reused
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
if ! "$LMMS_VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup-lmms] installing torch==$TORCH_VERSION"
  # a local build label (2.13.0+cpu) is found only where such wheels are at hand; else the plain release
  "$LMMS_VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" 2>/dev/null \
    || "$LMMS_VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION%%+*}"
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
# lmms-eval is installed without those two; with a CUDA torch, with everything it declares.
cuda="$("$LMMS_VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
echo "[setup-lmms] installing lmms-eval==$LMMS_EVAL_VERSION and visionzip-llava (torch pinned to $torch_version)"
quiet_pip() {  # pip -q, without the per-package notes about this machine's extra local index folders
  "$LMMS_VENV/bin/python" -m pip install -q -c "$LMMS_VENV/constraints.txt" "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
  return "${PIPESTATUS[0]}"
}
if [ -n "$cuda" ]; then
  quiet_pip "lmms-eval==$LMMS_EVAL_VERSION" -e "$ROOT"
else
  quiet_pip --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
  mapfile -t requirements < <("$LMMS_VENV/bin/python" - <<'PY'
import re
from importlib.metadata import requires

for requirement in requires("lmms-eval") or []:
    name = re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower()
    if "extra ==" not in requirement and name not in ("torchvision", "timm"):
        print(requirement)
PY
)
  quiet_pip "${requirements[@]}" -e "$ROOT"
  echo "[setup-lmms] (pip's note that lmms-eval requires torchvision and timm is expected: see this script)"
  # a torchvision left from an earlier install would break transformers' imports (see above)
  if ! "$LMMS_VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    "$LMMS_VENV/bin/python" -m pip uninstall -q -y torchvision timm 2>/dev/null || true
  fi
fi
"$LMMS_VENV/bin/python" -c "import lmms_eval.models as m; assert 'visionzip_llava' in m.list_available_models()" \
  || { echo "[setup-lmms] lmms-eval does not list visionzip_llava: the entry point is missing" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup-lmms] done in $(( $(date +%s) - start )) s"
