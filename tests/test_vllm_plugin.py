"""The vLLM serving plugin's parts that need no vLLM: the entry point, the lazy registration and the
``python -m llava.serve.vllm`` wrapper's command and refusals. The engine itself (vLLM's CPU backend in
``.venv-vllm``) is tested by ``tests/serving/test_vllm_engine.py``, run by ``bash scripts/test_serving.sh``
(docs/serving.md: why it is not part of the default suite)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"


def test_plugin_entry_point_and_lazy_registration():
    """setup.py declares the vllm.general_plugins entry point; importing the plugin module imports no vLLM
    (vLLM loads it in every process it starts), and it registers the architecture by import path."""
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert '"vllm.general_plugins"' in setup and "visionzip.vllm:register" in setup
    probe = "import sys, visionzip, visionzip.vllm as p; print(sorted(p.ARCHITECTURES)); print('vllm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [f"['{ARCHITECTURE}']", "False"]


def test_serve_wrapper_builds_the_documented_command_and_refuses_bad_specs():
    from llava.serve.vllm import serve_command

    command, print_only = serve_command(
        ["--model", "/m", "--compression", "visionzip:64", "--port", "9000", "--hf-overrides", '{"max_position_embeddings": 2048}']
    )
    assert not print_only and command[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides == {"max_position_embeddings": 2048, "architectures": [ARCHITECTURE],
                         "visual_compression": "visionzip:dominant=54,contextual=10"}
    assert command[-2:] == ["--port", "9000"]
    assert "--hf-overrides" not in serve_command(["--model", "/m", "--compression", "none"])[0]
    with pytest.raises(ValueError, match="stage 'llm'"):
        serve_command(["--model", "/m", "--compression", "fastv:64"])
    with pytest.raises(ValueError, match="nosuch"):
        serve_command(["--model", "/m", "--compression", "nosuch:64"])
