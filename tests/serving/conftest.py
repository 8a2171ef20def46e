"""What the vLLM engine tests share: the environment they run vLLM in (.venv-vllm, or $VLLM_VENV)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of the vLLM environment; a missing environment fails the test (it is not a skip)."""
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(
            f"the vLLM environment {VLLM_VENV} is missing: run `bash scripts/setup_vllm_env.sh` (the README's "
            "test command does it before the tests)"
        )
    return python
