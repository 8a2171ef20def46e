"""The vLLM serving plugin's parts that need no vLLM: the entry point, the lazy registration and the
``python -m llava.serve.vllm`` wrapper's command and refusals. The engine itself (vLLM's CPU backend in
``.venv-vllm``) is tested by ``tests/serving/test_vllm_engine.py``, which ``bash scripts/test.sh`` runs beside
this suite once it has set up ``.venv-vllm`` in the background (docs/serving.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "VisionZipLlavaNextForConditionalGeneration"


def test_plugin_entry_point_and_lazy_registration():
    """setup.py declares the vllm.general_plugins entry point; importing the plugin module imports no vLLM
    (vLLM loads it in every process it starts), and it registers the architecture by import path."""
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert '"vllm.general_plugins"' in setup and "visionzip.vllm:register" in setup
    probe = "import sys, visionzip, visionzip.vllm as p; print(sorted(p.ARCHITECTURES)); print('vllm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [f"['{ARCHITECTURE}',", f"'{NEXT_ARCHITECTURE}',",
                                   "'VisionZipQwen2_5_VLForConditionalGeneration']", "False"]


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


def test_serve_bench_configurations_and_model_folder(tmp_path):
    """``python -m llava.bench.serve``: vanilla first, then each method at each budget; in-LLM and unknown
    methods refused before any engine starts; the random-weight model folder is a llava-hf LLaVA (NeXT for
    anyres geometries) whose processor expands <image> to the tower's 576 patches."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from llava.bench.serve import configurations, write_model

    assert configurations(["visionzip", "pooling"], [64, 128]) == [
        "none", "visionzip:64", "visionzip:128", "pooling:64", "pooling:128"]
    with pytest.raises(ValueError, match="fastv"):
        configurations(["fastv"], [64])
    with pytest.raises(ValueError, match="nosuch"):
        configurations(["nosuch"], [64])
    folder = write_model("tiny", tmp_path / "tiny")
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["LlavaForConditionalGeneration"] and config.vision_config.num_hidden_layers == 24
    processor = AutoProcessor.from_pretrained(folder)
    ids = processor(text="USER: <image>\ndescribe ASSISTANT:", images=Image.new("RGB", (336, 336)))["input_ids"][0]
    assert list(ids).count(config.image_token_id) == 576
    next_config = AutoConfig.from_pretrained(write_model("tiny-next", tmp_path / "tiny-next"))
    assert next_config.architectures == ["LlavaNextForConditionalGeneration"] and next_config.image_grid_pinpoints
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == "USER: <image>\ndescribe ASSISTANT:"


def test_serve_wrapper_picks_the_architecture_from_the_checkpoint(tmp_path):
    """A LLaVA-NeXT folder gets the NeXT architecture, a LLaVA-1.5 folder LLaVA's; another family is refused."""
    from llava.serve.vllm import serve_command

    def overrides_for(architecture: str) -> dict:
        folder = tmp_path / architecture
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
        command, _ = serve_command(["--model", str(folder), "--compression", "visionzip:64"])
        return json.loads(command[command.index("--hf-overrides") + 1])

    assert overrides_for("LlavaNextForConditionalGeneration")["architectures"] == [NEXT_ARCHITECTURE]
    assert overrides_for("LlavaForConditionalGeneration")["architectures"] == [ARCHITECTURE]
    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration"):
        overrides_for("Qwen2VLForConditionalGeneration")


def test_uv_is_given_the_package_sources_pip_is_configured_with():
    """scripts/setup_vllm_env.sh installs with uv, which does not read pip's configuration: the sources pip
    is configured with (here through PIP_* variables, which win over files as in pip) are passed on."""
    import os

    env = dict(os.environ, PIP_INDEX_URL="https://mirror.example/simple", PIP_FIND_LINKS="/wheels/a /wheels/b")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_env" / "uv_sources.py"), sys.executable],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    pairs = list(zip(done.stdout.split()[::2], done.stdout.split()[1::2]))
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--find-links", "/wheels/a") in pairs and ("--find-links", "/wheels/b") in pairs


def test_encode_on_tower_hands_vllm_contiguous_tokens_of_the_reserved_count():
    """The plugin's encode step (vLLM-free, here on a transformers CLIP tower): pooling's tokens of a single
    image are a transposed view, which vLLM's CPU linear kernels refuse in its worker processes (found by
    ``llava.bench.serve``: vLLM encodes one image per step there): they leave contiguous; a count other than
    the reserved one is a named error."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from visionzip.config import CompressionConfig
    from visionzip.encoders import encoder_adapter
    from visionzip.vllm.encoders import encode_on_tower

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=112, patch_size=14, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=2)).eval()
    settings = CompressionConfig.parse("pooling:16").settings
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert not settings.encode(encoder_adapter(tower), pixels, -2).tokens.is_contiguous()  # why the step exists
        tokens = encode_on_tower(settings, encoder_adapter(tower), pixels, -2, 16).tokens
        assert tokens.shape == (1, 16, 32) and tokens.is_contiguous()
        with pytest.raises(ValueError, match="reserved 17 placeholders"):
            encode_on_tower(settings, encoder_adapter(tower), pixels, -2, 17)
