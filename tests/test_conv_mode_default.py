"""Without ``--conv-mode`` the front-ends prompt with the checkpoint's own template, read from its
``model_type``: ``mistral_instruct`` for ``llava_mistral`` (llava-v1.6-mistral-7b), ``vicuna_v1`` otherwise."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava.eval import run_llava
from llava.eval.generate import LlavaAnswerer
from llava.model.builder import default_conv_mode, load_pretrained_model
from llava.model.language_model.llava_mistral import CONV_MODE
from llava.model.tiny import build_tiny_llava
from llava.processor import LlavaProcessor
from llava.serve import cli as serve_cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny LLaVA-NeXT checkpoint, and a copy relabelled as an original ``llava_mistral`` one (a Mistral
    decoder without sliding window computes what the LLaMA decoder does: tests/test_hf_mistral.py)."""
    root = tmp_path_factory.mktemp("conv_mode")
    vicuna = build_tiny_llava(str(root / "llava-v1.6-tiny"), version="v1.6")
    mistral = build_tiny_llava(str(root / "llava-v1.6-mistral-tiny"), version="v1.6")
    config_file = root / "llava-v1.6-mistral-tiny" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"], sliding_window=None)
    config_file.write_text(json.dumps(config))
    return {"vicuna": vicuna, "mistral": mistral}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv_mode_image") / "noise.png"
    Image.fromarray((np.random.default_rng(2).random((120, 160, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def test_template_follows_the_model_type_of_any_form(checkpoints):
    assert CONV_MODE == "mistral_instruct"
    assert default_conv_mode(checkpoints["mistral"]) == CONV_MODE
    assert default_conv_mode(checkpoints["vicuna"]) == "vicuna_v1"
    assert default_conv_mode({"model_type": "llava_mistral"}) == CONV_MODE
    assert default_conv_mode({"model_type": "llava_llama"}) == default_conv_mode({}) == "vicuna_v1"
    _, model, _, _ = load_pretrained_model(checkpoints["mistral"], None, None, device="cpu")
    assert model.config.model_type == "llava_mistral"
    assert default_conv_mode(model) == default_conv_mode(model.config) == CONV_MODE


def test_a_folder_without_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        default_conv_mode(str(tmp_path))


class RecordingProcessor(LlavaProcessor):
    """LlavaProcessor that remembers the template each front-end built it with."""

    templates: list[str] = []

    @classmethod
    def from_model(cls, model, tokenizer, image_processor, conv_mode: str = "vicuna_v1", padding_side: str = "left"):
        cls.templates.append(conv_mode)
        return super().from_model(model, tokenizer, image_processor, conv_mode, padding_side)


def test_run_llava_picks_the_template_unless_given(checkpoints, image_file, monkeypatch, capsys):
    # run_llava builds its processor through llava.eval.model_processor.processor_for, which imports it from here
    monkeypatch.setattr("llava.processor.LlavaProcessor", RecordingProcessor)
    RecordingProcessor.templates = []
    common = ["--image-file", image_file, "--query", "What is this?", "--device", "cpu", "--temperature", "0",
              "--max_new_tokens", "2"]
    # llava_mistral runs LLaVA-NeXT's own image pipeline, compression included
    assert run_llava.main(["--model-path", checkpoints["mistral"], *common, "--compression", "visionzip:32"]) == 0
    assert run_llava.main(["--model-path", checkpoints["vicuna"], *common]) == 0
    assert run_llava.main(["--model-path", checkpoints["mistral"], *common, "--conv-mode", "vicuna_v1"]) == 0
    assert RecordingProcessor.templates == [CONV_MODE, "vicuna_v1", "vicuna_v1"]
    capsys.readouterr()


def test_eval_engine_picks_the_template(checkpoints):
    answerer = LlavaAnswerer(checkpoints["mistral"], None, None, None, "cpu", "float32", max_new_tokens=2)
    assert answerer.conv_mode == answerer.processor.conv_mode == CONV_MODE
    # the mistral_instruct prompt: [INST] ... [/INST], not vicuna's "USER: ... ASSISTANT:"
    prompt = answerer.processor.build_prompt("What is this?", 1)
    assert "[INST]" in prompt and "[/INST]" in prompt and "ASSISTANT:" not in prompt
    with pytest.raises(ValueError, match="unknown --conv-mode 'nosuch'"):
        LlavaAnswerer(checkpoints["mistral"], None, "nosuch", None, "cpu", "float32")


class StopBeforeChat(Exception):
    pass


def test_serve_cli_picks_the_template(checkpoints, image_file, monkeypatch):
    chosen = []

    def recording_session(*args, conv_mode, **kwargs):
        chosen.append(conv_mode)
        raise StopBeforeChat

    monkeypatch.setattr(serve_cli, "ChatSession", recording_session)
    with pytest.raises(StopBeforeChat):
        serve_cli.main(["--model-path", checkpoints["mistral"], "--image-file", image_file, "--device", "cpu"])
    assert chosen == [CONV_MODE]
