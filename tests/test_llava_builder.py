"""The tiny-model builder and ``load_pretrained_model`` on every kind of checkpoint (full, projector-only,
LoRA, plain language model, 8-bit, 4-bit), told apart by content."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import inspect_checkpoint, load_pretrained_model
from llava.model.tiny import TOWER_DIR, build_tiny_llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {version: build_tiny_llava(str(root / version), version=version) for version in ("v1.5", "v1.6")}


@pytest.fixture(scope="module")
def inputs(tiny):
    tokenizer, model, processor, _ = load_pretrained_model(tiny["v1.5"], None, None, device="cpu")
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\nWhat is in the picture?")
    conv.append_message(conv.roles[1], None)
    image = Image.fromarray((np.random.default_rng(1).random((200, 260, 3)) * 255).astype("uint8"))
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels).logits
    return {"ids": ids, "pixels": pixels, "logits": logits, "model": model, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def language_base(tiny, inputs, tmp_path_factory):
    """The tiny model's language part saved as a plain LLaMA checkpoint (a ``--model-base``)."""
    base = tmp_path_factory.mktemp("base") / "llama"
    model = inputs["model"]
    text_config = {k: v for k, v in model.config.to_dict().items() if not k.startswith(("mm_", "image_", "tokenizer_"))}
    text_config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    for key in ("use_mm_proj", "visual_compression", "_name_or_path"):
        text_config.pop(key, None)
    llama = LlamaForCausalLM(LlamaConfig(**text_config))
    state = {k: v for k, v in model.state_dict().items() if "vision_tower" not in k and "mm_projector" not in k}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    llama.save_pretrained(base)
    inputs["tokenizer"].save_pretrained(base)
    return base


def llava_config_dir(tiny: str, target, with_tower: bool = True) -> None:
    """config.json of the tiny checkpoint (and its tower beside it) in ``target``."""
    os.makedirs(target, exist_ok=True)
    shutil.copy(os.path.join(tiny, "config.json"), target)
    if with_tower:
        shutil.copytree(os.path.join(tiny, TOWER_DIR), os.path.join(target, TOWER_DIR))


def test_tiny_build_is_deterministic_cached_and_safe(tiny, tmp_path):
    again = build_tiny_llava(str(tmp_path / "again"), version="v1.5")
    for name in ("model.safetensors", "tokenizer.model", os.path.join(TOWER_DIR, "model.safetensors")):
        with open(os.path.join(tiny["v1.5"], name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    stamp = os.path.getmtime(os.path.join(again, "model.safetensors"))
    assert build_tiny_llava(again, version="v1.5") == again
    assert os.path.getmtime(os.path.join(again, "model.safetensors")) == stamp
    with pytest.raises(ValueError, match="another tiny build"):
        build_tiny_llava(again, version="v1.6")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to write"):
        build_tiny_llava(str(tmp_path / "foreign"))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"


def test_tiny_checkpoint_is_in_the_original_format(tiny):
    from safetensors import safe_open

    config = json.loads(open(os.path.join(tiny["v1.6"], "config.json")).read())
    assert config["model_type"] == "llava_llama" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_vision_tower"] == TOWER_DIR
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"]) == ("anyres", "spatial_unpad")
    with safe_open(os.path.join(tiny["v1.6"], "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.image_newline", "model.mm_projector.0.weight", "model.mm_projector.2.weight"} <= keys
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.23.") for k in keys)
    tower = json.loads(open(os.path.join(tiny["v1.6"], TOWER_DIR, "config.json")).read())
    assert (tower["image_size"], tower["patch_size"], tower["num_hidden_layers"]) == (336, 14, 24)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_tiny_model_generates(version, tiny):
    tokenizer, model, processor, context = load_pretrained_model(tiny[version], None, None, device="cpu")
    assert context == 2048 and model.dtype == torch.float32
    assert model.get_vision_tower().vision_tower_name == os.path.join(tiny[version], TOWER_DIR)
    image = Image.fromarray((np.random.default_rng(2).random((240, 500, 3)) * 255).astype("uint8"))
    ids = tokenizer_image_token("USER: <image>\nHi ASSISTANT:", tokenizer, return_tensors="pt")[None]
    out = model.generate(ids, images=process_images([image], processor, model.config), image_sizes=[image.size],
                         max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 4)


def test_projector_only_checkpoint_on_a_base(tiny, inputs, language_base, tmp_path):
    checkpoint = tmp_path / "projector"
    llava_config_dir(tiny["v1.5"], checkpoint)
    projector = {k: v for k, v in inputs["model"].state_dict().items() if "mm_projector" in k}
    torch.save(projector, checkpoint / "mm_projector.bin")
    assert inspect_checkpoint(str(checkpoint)).kind == "projector"
    with pytest.raises(ValueError, match="pass model_base"):
        load_pretrained_model(str(checkpoint), None, None, device="cpu")
    _, model, _, _ = load_pretrained_model(str(checkpoint), str(language_base), None, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=inputs["ids"], images=inputs["pixels"]).logits
    torch.testing.assert_close(logits, inputs["logits"])


def test_lora_checkpoint_on_a_base(tiny, inputs, language_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    checkpoint = tmp_path / "lora"
    trained = LlavaLlamaForCausalLM.from_pretrained(tiny["v1.5"])
    peft_model = get_peft_model(trained, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
        projector = peft_model.base_model.model.get_model().mm_projector
        projector[0].bias.add_(0.1)
    peft_model.save_pretrained(checkpoint)
    non_lora = {f"base_model.model.model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    torch.save(non_lora, checkpoint / "non_lora_trainables.bin")
    llava_config_dir(tiny["v1.5"], checkpoint)
    with torch.no_grad():
        expected = peft_model(input_ids=inputs["ids"], images=inputs["pixels"]).logits
    assert not torch.allclose(expected, inputs["logits"], atol=1e-3)

    assert inspect_checkpoint(str(checkpoint)).kind == "lora"
    _, model, _, _ = load_pretrained_model(str(checkpoint), str(language_base), None, device="cpu")
    assert type(model) is LlavaLlamaForCausalLM
    with torch.no_grad():
        logits = model(input_ids=inputs["ids"], images=inputs["pixels"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_plain_language_model(language_base):
    tokenizer, model, processor, _ = load_pretrained_model(str(language_base), None, None, device="cpu")
    assert processor is None and type(model) is LlamaForCausalLM
    out = model.generate(tokenizer("hello", return_tensors="pt").input_ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 3


def test_unrecognisable_checkpoints_are_refused(tiny, language_base, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained_model(str(tmp_path / "empty"), None, None, device="cpu")
    llava_config_dir(tiny["v1.5"], tmp_path / "config-only", with_tower=False)
    with pytest.raises(ValueError, match="cannot tell what .* holds: no model weights"):
        load_pretrained_model(str(tmp_path / "config-only"), None, None, device="cpu")
    # the folder name says "llava", the content says nothing: still refused
    llava_config_dir(tiny["v1.5"], tmp_path / "llava-v1.5-7b", with_tower=False)
    with pytest.raises(ValueError, match="cannot tell"):
        load_pretrained_model(str(tmp_path / "llava-v1.5-7b"), None, None, device="cpu")
    with pytest.raises(ValueError, match="model_base .* is only for LoRA or projector-only"):
        load_pretrained_model(tiny["v1.5"], str(language_base), None, device="cpu")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_loads_generate_on_cpu(bits, tiny, inputs):
    import bitsandbytes as bnb

    _, model, _, _ = load_pretrained_model(
        tiny["v1.5"], None, None, device="cpu", load_8bit=bits == 8, load_4bit=bits == 4
    )
    layer = model.get_model().layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    # the vision tower stays in floating point, as in the original
    assert model.get_vision_tower().dtype == torch.float32
    with torch.no_grad():
        out = model.generate(inputs["ids"], images=inputs["pixels"], max_new_tokens=4, do_sample=False)
        logits = model(input_ids=inputs["ids"], images=inputs["pixels"]).logits
    assert out.shape == (1, 4)
    # quantisation error, not a different model
    assert (logits - inputs["logits"]).abs().max() < 0.5 * inputs["logits"].abs().max()
