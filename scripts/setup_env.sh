#!/usr/bin/env bash
# Create the project's virtual environment (once) and install the project with its extras.
#
#   VENV=/path/to/venv   where to put it (default: .venv in the repository)
#   TORCH_VERSION=2.x.y  torch to install when the venv has none (default 2.13.0); an existing
#                        torch (e.g. a CUDA build you installed yourself) is kept and pinned, so
#                        pip never replaces it with another build.
#   EXTRAS=train,dev     extras to install (default: train,dev)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-train,dev}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.visionzip-llava-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import llava, visionzip" 2>/dev/null; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}"
  "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
torch_version="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
# Pin torch to the installed build: without it a dependency could pull another torch (GBs of CUDA wheels).
echo "torch==$torch_version" > "$VENV/constraints.txt"
echo "[setup] installing visionzip-llava[$EXTRAS] (torch pinned to $torch_version)"
"$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -e "$ROOT[$EXTRAS]"
echo "$want" > "$stamp"
