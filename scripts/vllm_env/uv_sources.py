"""Print uv's package-source arguments for the package sources pip is configured with on this machine.

scripts/setup_vllm_env.sh installs the vLLM environment with uv (about 20x faster than pip here: parallel
downloads, no bytecode compilation), but uv does not read pip's configuration. A machine whose pip is pointed at
a mirror or a local wheel folder (pip.conf, PIP_INDEX_URL, ...) must give uv the same sources, so this prints
``--index-url`` / ``--extra-index-url`` / ``--find-links`` arguments, one per line, from ``pip config list``
(pip's own view of its files and environment; the environment wins over files, as in pip). Nothing is printed
for a plain pip (uv then uses PyPI, as pip does).

    python scripts/vllm_env/uv_sources.py [PYTHON]     # PYTHON: the interpreter whose pip to ask
"""
from __future__ import annotations

import subprocess
import sys

OPTIONS = ("index-url", "extra-index-url", "find-links")
# pip's precedence, lowest first: configuration files, then PIP_* variables
SCOPES = ("global", "user", "site", "install", ":env:")


def pip_config(python: str) -> dict[str, str]:
    done = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False)
    found: dict[tuple[str, str], str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        scope, _, option = key.rpartition(".")
        if sep and option in OPTIONS and scope in SCOPES:
            found[(scope, option)] = value.strip().strip("'\"")
    chosen: dict[str, str] = {}
    for scope in SCOPES:
        for option in OPTIONS:
            if (scope, option) in found:
                chosen[option] = found[(scope, option)]
    return chosen


def main() -> None:
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    for option, value in pip_config(python).items():
        for item in value.split():
            print(f"--{option}")
            print(item)


if __name__ == "__main__":
    main()
