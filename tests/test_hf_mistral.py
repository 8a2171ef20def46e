"""``llava_mistral`` checkpoints (llava-v1.6-mistral) load in our stack, compute what transformers'
``MistralForCausalLM`` computes, and a sliding window we cannot honour is refused by name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import MistralConfig, MistralForCausalLM

from llava.conversation import conv_templates
from llava.model import LlavaMistralForCausalLM
from llava.model.builder import load_pretrained_model
from llava.model.language_model.llava_mistral import CONV_MODE


@pytest.fixture(scope="module")
def mistral_checkpoint(official_dir, tmp_path_factory):
    """The fixture's tiny LLaVA-NeXT relabelled as an original ``llava_mistral`` checkpoint."""
    root = tmp_path_factory.mktemp("mistral")
    shutil.copytree(official_dir / "llava-v1.6-tiny", root / "llava-v1.6-mistral-tiny")
    shutil.copytree(official_dir / "clip-vit-tiny-336", root / "clip-vit-tiny-336")
    config_file = root / "llava-v1.6-mistral-tiny" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"], sliding_window=None)
    config_file.write_text(json.dumps(config))
    return root / "llava-v1.6-mistral-tiny"


def test_llava_mistral_loads_and_matches_transformers_mistral(mistral_checkpoint):
    tokenizer, model, image_processor, _ = load_pretrained_model(str(mistral_checkpoint), None, None, device="cpu")
    assert isinstance(model, LlavaMistralForCausalLM) and image_processor is not None
    assert model.config.model_type == "llava_mistral"
    assert CONV_MODE in conv_templates
    config = json.loads((mistral_checkpoint / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings")
    reference = MistralForCausalLM(MistralConfig(**{k: config[k] for k in keys}, sliding_window=None)).eval()
    weights = {k: v for k, v in load_file(str(mistral_checkpoint / "model.safetensors")).items()
               if not k.startswith(("model.vision_tower.", "model.mm_projector.", "model.image_newline"))}
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    prompt = tokenizer(conv_templates[CONV_MODE].copy().get_prompt() + "What is in the picture?", return_tensors="pt")
    with torch.no_grad():
        ours = model(input_ids=prompt.input_ids).logits
        theirs = reference(input_ids=prompt.input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_shorter_than_the_context_is_refused(mistral_checkpoint, tmp_path):
    folder = tmp_path / "windowed"
    shutil.copytree(mistral_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(sliding_window=16, mm_vision_tower=str(mistral_checkpoint.parent / "clip-vit-tiny-336"))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding_window=16 is shorter than max_position_embeddings=4096"):
        load_pretrained_model(str(folder), None, None, device="cpu")
