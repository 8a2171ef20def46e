# Sourced by scripts/setup_env.sh, setup_lmms_env.sh and setup_vllm_env.sh: the three environments install with
# uv (parallel downloads, files linked from one cache, no bytecode compiled), pip-installed into each venv.
#
#   use_uv VENV TAG      install uv==$UV_VERSION into VENV where it is missing (TAG prefixes the message), and
#                        set UV_SOURCES to the package sources pip is configured with (uv does not read pip's
#                        configuration: mirrors, a local wheel folder; scripts/vllm_env/uv_sources.py)
#   uv_install ARGS...   uv pip install ARGS into that venv, from UV_SOURCES, with pip's choice of the best
#                        version over all of them
# Needs ROOT (the repository) and UV_VERSION.
use_uv() {
  UV_VENV=$1
  if ! "$UV_VENV/bin/python" -m uv --version 2>/dev/null | grep -q "^uv $UV_VERSION\b"; then
    echo "[$2] installing uv==$UV_VERSION"
    "$UV_VENV/bin/python" -m pip install -q "uv==$UV_VERSION" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  fi
  mapfile -t UV_SOURCES < <("$UV_VENV/bin/python" "$ROOT/scripts/vllm_env/uv_sources.py" "$UV_VENV/bin/python")
}

uv_install() {
  "$UV_VENV/bin/python" -m uv pip install --quiet --python "$UV_VENV/bin/python" \
    --index-strategy unsafe-best-match "${UV_SOURCES[@]}" "$@"
}
