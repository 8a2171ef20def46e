"""Hugging Face LLaVA / LLaVA-NeXT classes with compression: per-instance install, the compression-aware
processor, batched generation, every registered vision-side method, bad input. Tiny random models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip
from visionzip import CompressionConfig, get_method, registered_methods
from visionzip.anyres import official_anyres_layout
from visionzip.hf import compression_aware_processor, current_compression, supported_classes
from visionzip.hf.tiny import tiny_llava, tiny_llava_next

PROMPTS = ["USER: <image> what is in the picture ASSISTANT:", "USER: <image> describe it ASSISTANT:"]
VISION_METHODS = [m for m in registered_methods() if get_method(m).stage != "llm"]


def images(sizes=((60, 50), (80, 40))):
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next()


def placeholders(inputs, model) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def greedy(model, inputs, tokens=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def batched_equals_one_by_one(model, processor, pics):
    batch = processor(text=PROMPTS, images=pics, return_tensors="pt", padding=True)
    with torch.no_grad():
        batched_last = model(**batch).logits[:, -1]
    batched_tokens = greedy(model, batch)
    for row, (prompt, pic) in enumerate(zip(PROMPTS, pics)):
        single = processor(text=[prompt], images=[pic], return_tensors="pt", padding=True)
        with torch.no_grad():
            single_last = model(**single).logits[:, -1]
        torch.testing.assert_close(batched_last[row : row + 1], single_last, atol=1e-4, rtol=1e-4)
        assert greedy(model, single).tolist() == batched_tokens[row : row + 1].tolist()


def test_supported_classes_are_registered():
    assert {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"} <= set(supported_classes())


def test_llava_features_are_the_compressed_tower_tokens_projected(llava):
    model, processor = llava
    visionzip.apply_compression(model, "visionzip:dominant=6,contextual=3")
    try:
        pixels = processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)["pixel_values"]
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels).pooler_output
            direct = visionzip.zip_vision_tokens(model.model.vision_tower, pixels, 6, 3, select_layer=-2)
            expected = model.model.multi_modal_projector(direct.tokens)
        assert [f.shape for f in features] == [torch.Size([9, 32])] * 2
        torch.testing.assert_close(torch.stack(features), expected)
        assert model.config.visual_compression == CompressionConfig.parse("visionzip:dominant=6,contextual=3").to_dict()
    finally:
        visionzip.apply_compression(model, "none")


@pytest.mark.parametrize("method", VISION_METHODS)
def test_llava_every_vision_method_generates_batched(llava, method):
    model, processor = llava
    visionzip.apply_compression(model, f"{method}:24")  # ToMe needs >= 21 on this 2-layer tower
    try:
        aware = compression_aware_processor(processor, model)
        per_image = current_compression(model).settings.tokens_per_view(65)
        inputs = aware(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
        assert placeholders(inputs, model) == [per_image, per_image]
        with torch.no_grad():
            features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        assert [f.shape[0] for f in features] == [per_image, per_image]
        assert greedy(model, inputs).shape == (2, 4)
    finally:
        visionzip.apply_compression(model, "none")


# each image is compressed on its own by these (the random baseline seeds by batch position on purpose)
@pytest.mark.parametrize("spec", ["visionzip:8", "vispruner:8", "tome:24"])
def test_llava_batched_equals_one_by_one(llava, spec):
    model, processor = llava
    visionzip.apply_compression(model, spec)
    try:
        batched_equals_one_by_one(model, compression_aware_processor(processor, model), images())
    finally:
        visionzip.apply_compression(model, "none")


def test_none_removes_the_compression_from_the_instance(llava):
    model, processor = llava
    other, _ = tiny_llava(seed=1)
    visionzip.visionzip(model, dominant=6, contextual=2)
    assert "get_image_features" in model.model.__dict__
    assert "get_image_features" not in other.model.__dict__  # nothing global
    visionzip.apply_compression(model, "none")
    assert "get_image_features" not in model.model.__dict__
    assert compression_aware_processor(processor, model) is processor
    inputs = processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    assert placeholders(inputs, model) == [64, 64]  # CLIP's 64 patches, CLS dropped ("default")
    assert greedy(model, inputs).shape == (2, 4)


def test_unaware_processor_is_refused_before_the_language_model(llava):
    model, processor = llava
    visionzip.apply_compression(model, "visionzip:8")
    try:
        inputs = processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
        with pytest.raises(ValueError, match="128 image placeholder tokens but visionzip.* gives 16 image features"):
            model(**inputs)
        with pytest.raises(ValueError, match="compression_aware_processor"):
            model.generate(**inputs, max_new_tokens=2)
    finally:
        visionzip.apply_compression(model, "none")


def test_bad_input_is_named(llava):
    model, _ = llava
    with pytest.raises(ValueError, match="exceeds the 65 tokens"):
        visionzip.apply_compression(model, "visionzip:dominant=60,contextual=10")
    assert "get_image_features" not in model.model.__dict__
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration.*LlavaNextForConditionalGeneration"):
        visionzip.apply_compression(plain, "visionzip:8")
    # an in-LLM method is checked against the LLM's depth (FastV's paper K = 2 needs 3 layers; the tiny has 2)
    with pytest.raises(ValueError, match="fastv: layer 2 is outside \\[1, 1\\] for an LLM of 2 decoder layers"):
        visionzip.apply_compression(model, "fastv:8")
    assert "forward" not in model.model.language_model.__dict__
    model.config.vision_feature_layer = [-2, -1]
    try:
        with pytest.raises(ValueError, match="single integer layer"):
            visionzip.apply_compression(model, "visionzip:8")
    finally:
        model.config.vision_feature_layer = -2


def test_llava_next_layout_counts_and_batching(llava_next):
    model, processor = llava_next
    # a wide image picks the 1 x 2 crop grid, a tall one 2 x 1: 3 views each, crops laid out differently
    pics = images(((120, 50), (50, 120)))
    visionzip.apply_compression(model, "visionzip:dominant=5,contextual=3")
    try:
        aware = compression_aware_processor(processor, model)
        inputs = aware(text=PROMPTS, images=pics, return_tensors="pt", padding=True)
        sizes = inputs["image_sizes"].tolist()
        with torch.no_grad():
            features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output
        assert placeholders(inputs, model) == [f.shape[0] for f in features] == [3 * 8, 3 * 8]
        # the official layout: base view, then the crops' kept tokens on the full grid, CLS, merged tokens
        views = inputs["pixel_values"][0, :3]
        with torch.no_grad():
            direct = visionzip.compress(model.model.vision_tower, views, CompressionConfig.parse("visionzip:5,3"))
            projected = model.model.multi_modal_projector(direct.tokens)
        from visionzip import CompressedTokens

        crops = CompressedTokens(projected[1:], direct.keep_indices[1:], True, True)
        rows, cols = (1, 2) if sizes[0][1] > sizes[0][0] else (2, 1)
        expected = torch.cat([projected[0], official_anyres_layout(crops, rows, cols, 8)])
        torch.testing.assert_close(features[0], expected)
        batched_equals_one_by_one(model, aware, pics)
        with pytest.raises(ValueError, match="gives 48 image features"):
            model(**processor(text=PROMPTS, images=pics, return_tensors="pt", padding=True))
    finally:
        visionzip.apply_compression(model, "none")


def test_llava_next_takes_the_spatial_layout_and_refuses_oversized_budgets(llava_next):
    model, _ = llava_next
    visionzip.apply_compression(model, "visionzip:8", anyres_layout="spatial")  # tests/test_pipeline.py runs it
    assert current_compression(model).anyres_layout == "spatial"
    visionzip.apply_compression(model, "none")
    with pytest.raises(ValueError, match="exceeds the 65 tokens"):
        visionzip.apply_compression(model, "visionzip:dominant=60,contextual=6")
