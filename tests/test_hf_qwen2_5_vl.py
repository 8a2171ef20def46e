"""Qwen2.5-VL (transformers' class): VisionZip on the merged tokens held to the re-enacted official port per
sample, batched (images of different sizes, left padding) = one by one, original M-RoPE positions, generate,
bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import visionzip
import visionzip.hf
from visionzip import CompressionConfig
from visionzip.hf import qwen2_5_vl
from visionzip.hf.qwen2_5_vl_reference import official_qwen2_5_vl
from visionzip.hf.tiny import tiny_qwen2_5_vl

SPEC = "visionzip:dominant=5,contextual=2"
PROMPTS = [
    "USER: <|vision_start|><|image_pad|><|vision_end|> describe it ASSISTANT:",
    "USER: what is in <|vision_start|><|image_pad|><|vision_end|> ASSISTANT:",
]


def images():
    """112 x 168 (8 x 12 patches, 24 merged tokens, two windows) and 140 x 112 (10 x 8 patches, 20 merged
    tokens, a padded window row)."""
    rng = np.random.RandomState(0)
    return [rng.randint(0, 255, (112, 168, 3), dtype=np.uint8), rng.randint(0, 255, (140, 112, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def eager():
    model, processor = tiny_qwen2_5_vl(attn_implementation="eager")
    return model, processor


@pytest.fixture(scope="module")
def sdpa():
    model, processor = tiny_qwen2_5_vl()
    visionzip.apply_compression(model, SPEC)
    return model, processor, visionzip.hf.compression_aware_processor(processor, model)


def llm_positions(model, inputs) -> torch.Tensor:
    """The M-RoPE position ids the language model receives in a forward of ``inputs``."""
    seen = {}

    def grab(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["position_ids"]


@pytest.mark.parametrize("dominant,contextual", [(5, 2), (15, 1), (3, 3)])  # (15, 1): the official 0.65 / 0.05 of 24
def test_matches_the_official_port_per_sample(eager, dominant, contextual):
    model, processor = eager
    visionzip.apply_compression(model, f"visionzip:dominant={dominant},contextual={contextual}")
    aware = visionzip.hf.compression_aware_processor(processor, model)
    for prompt, image in zip(PROMPTS, images()):
        full = processor(text=[prompt], images=[image], return_tensors="pt")
        official = official_qwen2_5_vl(model, full["input_ids"], full["pixel_values"], full["image_grid_thw"], dominant, contextual)
        inputs = aware(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            logits = model(**inputs).logits
        assert ours.keep_indices[0].tolist() == official.keep.tolist()
        torch.testing.assert_close(ours.pooler_output[0], official.image_tokens, atol=1e-6, rtol=1e-6)
        assert logits.shape == official.logits.shape
        torch.testing.assert_close(logits, official.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(llm_positions(model, inputs), official.position_ids)
    assert qwen2_5_vl.official_ratio_counts(24) == (15, 1)


def test_matches_the_official_port_when_the_last_block_attends_in_windows():
    """The official eager path scores whatever the last block attends: with windows, each window's queries
    (a sum over queries, so windows of different sizes weigh differently)."""
    model, processor = tiny_qwen2_5_vl(attn_implementation="eager")
    model.model.visual.fullatt_block_indexes = [0]  # this instance only: the last block attends in 2 x 2-unit windows
    visionzip.apply_compression(model, "visionzip:dominant=6,contextual=2")
    aware = visionzip.hf.compression_aware_processor(processor, model)
    for prompt, image in zip(PROMPTS, images()):
        full = processor(text=[prompt], images=[image], return_tensors="pt")
        official = official_qwen2_5_vl(model, full["input_ids"], full["pixel_values"], full["image_grid_thw"], 6, 2)
        inputs = aware(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            logits = model(**inputs).logits
        assert ours.keep_indices[0].tolist() == official.keep.tolist()
        torch.testing.assert_close(logits, official.logits, atol=1e-4, rtol=1e-4)


def test_placeholders_equal_kept_tokens_at_their_original_positions(sdpa):
    model, processor, aware = sdpa
    inputs = aware(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    full = processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [7, 7]
    assert qwen2_5_vl.merged_counts(model, inputs["image_grid_thw"]) == [24, 20]
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert [f.shape[0] for f in encoded.pooler_output] == [7, 7]
    ours = llm_positions(model, inputs)
    inner = model.model
    original, _ = type(inner).get_rope_index(
        inner, full["input_ids"], full["mm_token_type_ids"], image_grid_thw=full["image_grid_thw"],
        attention_mask=full["attention_mask"],
    )
    for row, keep in enumerate(encoded.keep_indices):
        is_image = full["input_ids"][row] == model.config.image_token_id
        kept = is_image.clone()
        kept[is_image] = False
        kept[is_image.nonzero()[keep, 0]] = True
        survivors = (full["attention_mask"][row].bool() & ~is_image) | kept  # text + kept image tokens, in order
        mine = ours[:, row, inputs["attention_mask"][row].bool()]
        torch.testing.assert_close(mine, original[:, row, survivors])
        # the text after the image keeps its place: the compressed row is shorter, its positions are not
        assert mine[0, -1] == original[0, row, -1]


def test_batched_images_of_two_sizes_equal_one_by_one_and_generate(sdpa):
    model, _, aware = sdpa
    batch = aware(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].all())  # rows of different lengths: left padding
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        assert generated.shape == (2, 3)
        # beams repeat generate()'s pre-encoded images per sequence: the kept positions follow them
        beams = model.generate(**batch, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=2)
        assert beams.shape == (4, batch["input_ids"].shape[1] + 2)
        for row, (prompt, image) in enumerate(zip(PROMPTS, images())):
            single = aware(text=[prompt], images=[image], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[:, -1], batched[row : row + 1], atol=1e-4, rtol=1e-4)
            tokens = model.generate(**single, max_new_tokens=3, do_sample=False)
            assert tokens[:, -3:].tolist() == generated[row : row + 1].tolist()
            # decoding continues from the original positions: a full forward of prompt + first new token
            # (no cache) predicts the same second token as generate()'s cached step
            longer = {**single, "input_ids": tokens[:, :-2], "attention_mask": torch.ones_like(tokens[:, :-2]),
                      "mm_token_type_ids": torch.cat([single["mm_token_type_ids"], torch.zeros_like(tokens[:, -3:-2])], 1)}
            assert model(**longer).logits[0, -1].argmax().item() == tokens[0, -2].item()


def test_bad_input_is_named_before_the_forward(sdpa):
    model, processor, aware = sdpa
    inputs = aware(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    unaware = processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="44 image placeholder tokens but visionzip.* gives 14 image features"):
        model(**unaware)
    with pytest.raises(ValueError, match="vispruner is not adapted to Qwen2.5-VL"):
        visionzip.apply_compression(model, "vispruner:8")
    assert visionzip.hf.current_compression(model) == CompressionConfig.parse(SPEC)
    too_many = "dominant \\+ contextual = 22 exceeds the 20 merged tokens of image 1"
    visionzip.apply_compression(model, "visionzip:dominant=20,contextual=2")  # fits the 24-token image only
    try:
        with pytest.raises(ValueError, match=too_many):
            visionzip.hf.compression_aware_processor(processor, model)(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
        with pytest.raises(ValueError, match=too_many):
            model(**inputs)
    finally:
        visionzip.apply_compression(model, SPEC)


def test_none_restores_the_model():
    model, processor = tiny_qwen2_5_vl()
    inputs = processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**inputs).logits
        visionzip.apply_compression(model, SPEC)
        assert "get_rope_index" in vars(model.model) and "get_image_features" in vars(model.model)
        visionzip.apply_compression(model, "none")
        assert "get_rope_index" not in vars(model.model) and "get_image_features" not in vars(model.model)
        torch.testing.assert_close(model(**inputs).logits, before)
