"""Qwen2.5-VL (transformers' class): VisionZip on the merged tokens held to the re-enacted official port per
sample, batched (images of different sizes, left padding) = one by one, original M-RoPE positions, generate,
bad input; the other encoder-output methods (VisPruner, pooling, random) through their own ``compress`` on
the merged-token view, each held to its definition; tower-stage and CLS-only methods refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import visionzip
import visionzip.hf
from visionzip import CompressionConfig
from visionzip.hf import qwen2_5_vl
from visionzip.hf.qwen2_5_vl_reference import official_qwen2_5_vl, official_vision
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
    with pytest.raises(ValueError, match="tome acts inside the vision tower \\(stage 'tower'\\).*cannot run layer by layer"):
        visionzip.apply_compression(model, "tome:8")
    assert visionzip.hf.current_compression(model) == CompressionConfig.parse(SPEC)
    too_many = "image 1 \\(20 merged tokens\\): dominant \\+ contextual = 22 exceeds the 20 tokens"
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


# ----- the other encoder-output methods on the merged tokens ---------------------------------------------
def square_images():
    """112 x 112 (a 4 x 4 grid of merged tokens) and 168 x 168 (6 x 6): pooling needs square grids."""
    rng = np.random.RandomState(1)
    return [rng.randint(0, 255, (112, 112, 3), dtype=np.uint8), rng.randint(0, 255, (168, 168, 3), dtype=np.uint8)]


def original_positions(model, full, row: int, keep: torch.Tensor) -> torch.Tensor:
    """The uncompressed layout's M-RoPE positions (3, L') of row ``row``: its text and the image tokens at
    ``keep`` (raster indices among the image's merged tokens), padding dropped."""
    inner = model.model
    original, _ = type(inner).get_rope_index(
        inner, full["input_ids"], full["mm_token_type_ids"], image_grid_thw=full["image_grid_thw"],
        attention_mask=full["attention_mask"],
    )
    is_image = full["input_ids"][row] == model.config.image_token_id
    kept = torch.zeros_like(is_image)
    kept[is_image.nonzero()[keep, 0]] = True
    return original[:, row, (full["attention_mask"][row].bool() & ~is_image) | kept]


def uncompressed_features(model, inputs) -> tuple[torch.Tensor, ...]:
    inner = model.model
    with torch.no_grad():
        return type(inner).get_image_features(inner, inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output


@pytest.fixture(scope="module")
def plain():
    return tiny_qwen2_5_vl()


@pytest.mark.parametrize("spec,square", [("vispruner:8", False), ("random:8", False), ("pooling:9", True)])
def test_encoder_output_methods_keep_their_count_at_original_positions_batched_as_one_by_one(plain, spec, square):
    model, processor = plain
    pictures = square_images() if square else images()
    per_image = CompressionConfig.parse(spec).settings.tokens_per_view()
    visionzip.apply_compression(model, spec)
    try:
        aware = visionzip.hf.compression_aware_processor(processor, model)
        batch = aware(text=PROMPTS, images=pictures, return_tensors="pt", padding=True)
        full = processor(text=PROMPTS, images=pictures, return_tensors="pt", padding=True)
        assert not bool(batch["attention_mask"].all())  # left padding
        assert (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [per_image, per_image]
        counts = qwen2_5_vl.merged_counts(model, batch["image_grid_thw"])
        with torch.no_grad():
            encoded = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            batched = model(**batch).logits[:, -1]
            generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert generated.shape == (2, batch["input_ids"].shape[1] + 2)
        positions = llm_positions(model, batch)
        originals = uncompressed_features(model, batch)
        for row, (prompt, image) in enumerate(zip(PROMPTS, pictures)):
            keep = encoded.keep_indices[row]
            assert encoded.pooler_output[row].shape[0] == per_image and keep.shape == (per_image,)
            assert bool((keep[1:] >= keep[:-1]).all()) and 0 <= int(keep.min()) and int(keep.max()) < counts[row]
            if spec.startswith("pooling"):
                # the merged tokens' (h/2, w/2) grid average-pooled to 3 x 3, row by row
                side = int(counts[row] ** 0.5)
                grid = originals[row].T.reshape(1, -1, side, side)
                expected = F.adaptive_avg_pool2d(grid, (3, 3)).flatten(2)[0].T
                torch.testing.assert_close(encoded.pooler_output[row], expected)
                assert keep.tolist() == qwen2_5_vl.spread_positions(per_image, counts[row]).tolist()
            else:  # kept tokens are the merger's own outputs at their raster indices
                torch.testing.assert_close(encoded.pooler_output[row], originals[row][keep])
            if spec.startswith("random"):  # each image is compressed on its own: seed 0 for every image
                draw = torch.randperm(counts[row], generator=torch.Generator().manual_seed(0))[:per_image].sort().values
                assert keep.tolist() == draw.tolist()
            # every kept token at its original M-RoPE (t, h, w) position; the text after the image too
            mine = positions[:, row, batch["attention_mask"][row].bool()]
            torch.testing.assert_close(mine, original_positions(model, full, row, keep))
            single = aware(text=[prompt], images=[image], return_tensors="pt")
            with torch.no_grad():
                alone = model.model.get_image_features(single["pixel_values"], single["image_grid_thw"])
                torch.testing.assert_close(model(**single).logits[:, -1], batched[row : row + 1], atol=1e-4, rtol=1e-4)
                tokens = model.generate(**single, max_new_tokens=2, do_sample=False)
            assert alone.keep_indices[0].tolist() == keep.tolist()
            assert tokens[:, -2:].tolist() == generated[row : row + 1, -2:].tolist()
    finally:
        visionzip.apply_compression(model, "none")


def test_vispruner_ranks_merged_tokens_by_the_attention_their_patches_receive(eager):
    """No CLS: VisPruner's important half is the top of the official port's unit score (attention received
    by each unit's patches in the last block, re-enacted eagerly); the rest are other units."""
    model, processor = eager
    visionzip.apply_compression(model, "vispruner:tokens=10,important_ratio=0.5")
    try:
        aware = visionzip.hf.compression_aware_processor(processor, model)
        for prompt, image in zip(PROMPTS, images()):
            inputs = aware(text=[prompt], images=[image], return_tensors="pt")
            with torch.no_grad():
                keep = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).keep_indices[0]
                _, scores, _ = official_vision(model, inputs["pixel_values"], inputs["image_grid_thw"])
            assert set(scores.topk(5).indices.tolist()) <= set(keep.tolist()) and len(set(keep.tolist())) == 10
    finally:
        visionzip.apply_compression(model, SPEC)


def test_methods_that_cannot_act_on_merged_tokens_are_refused_by_name(plain):
    model, processor = plain
    with pytest.raises(ValueError, match="tome acts inside the vision tower \\(stage 'tower'\\); Qwen2.5-VL's tower"):
        visionzip.apply_compression(model, "tome:8")
    reasons = {
        "prumerge:8": "image 0 \\(24 merged tokens\\): prumerge ranks patches by CLS attention; "
        "Qwen2_5_VisionTransformerPretrainedModel has no CLS token",
        "pooling:4": "image 0 \\(24 merged tokens\\): its merged tokens lie on a 4 x 6 grid .*not a square one",
    }
    for spec, reason in reasons.items():
        visionzip.apply_compression(model, spec)
        try:
            aware = visionzip.hf.compression_aware_processor(processor, model)
            with pytest.raises(ValueError, match=reason):
                aware(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
            unaware = processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
            with pytest.raises(ValueError, match=reason):  # before the tower runs
                model(**unaware)
        finally:
            visionzip.apply_compression(model, "none")
