#!/usr/bin/env bash
# Create the project's virtual environment (once) and install the project with its extras.
#
#   VENV=/path/to/venv   where to put it (default: .venv in the repository)
#   TORCH_VERSION=2.x.y  torch to install when the venv has none (default 2.13.0); an existing
#                        torch (e.g. a CUDA build you installed yourself) is kept and pinned, so
#                        the installer never replaces it with another build.
#   EXTRAS=train,dev     extras to install (default: train,dev)
#   UV_VERSION=0.13.9    uv release used to install (as scripts/setup_vllm_env.sh and setup_lmms_env.sh)
#   SETUP_INSTALLER=pip  install with pip instead of uv (slower; the same packages)
#
# Installed with uv (pip-installed into the venv first): on a fresh 2-core machine 82 s and 80 CPU-s with pip,
# against about 20 s with uv (parallel downloads, files linked from uv's cache, no bytecode compiled: the first
# process that imports a module writes its .pyc). uv does not read pip's configuration, so the sources pip is
# configured with (mirrors, a local wheel folder) are passed on (scripts/uv_install.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-train,dev}"
UV_VERSION="${UV_VERSION:-0.13.9}"
INSTALLER="${SETUP_INSTALLER:-uv}"
case "$INSTALLER" in
  uv|pip) ;;
  *) echo "[setup] SETUP_INSTALLER must be uv or pip, got '$INSTALLER'" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.visionzip-llava-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import llava, visionzip" 2>/dev/null; then
  exit 0
fi
if [ "$INSTALLER" = uv ]; then
  source "$ROOT/scripts/uv_install.sh"
  use_uv "$VENV" setup
  install() { uv_install "$@"; }
else
  install() { "$VENV/bin/python" -m pip install -q "$@"; }
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}"
  install "torch==${TORCH_VERSION:-2.13.0}"
fi
torch_version="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
# Pin torch to the installed build: without it a dependency could pull another torch (GBs of CUDA wheels).
echo "torch==$torch_version" > "$VENV/constraints.txt"
echo "[setup] installing visionzip-llava[$EXTRAS] (torch pinned to $torch_version, with $INSTALLER)"
install -c "$VENV/constraints.txt" -e "$ROOT[$EXTRAS]"
echo "$want" > "$stamp"
