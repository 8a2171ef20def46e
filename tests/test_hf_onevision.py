"""LLaVA-OneVision (transformers' class, SigLIP without CLS): received-attention scoring, anyres images in
the official layout, multi-image samples, per-frame video budgets, batched = one by one, bad input."""
from __future__ import annotations

import pytest
import torch

import visionzip
import visionzip.hf
from visionzip import CompressedTokens, CompressionConfig
from visionzip.anyres import official_anyres_layout
from visionzip.hf import onevision
from visionzip.hf.tiny import tiny_onevision

SPEC = "visionzip:dominant=6,contextual=2"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = tiny_onevision()
    visionzip.apply_compression(model, SPEC)
    return model, tokenizer


def pixels(batch: int, views: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, views, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def prompt_ids(tokenizer, token: str, counts: list[int]) -> dict:
    text = [f"USER: {token * n} describe it ASSISTANT:" for n in counts]
    return dict(tokenizer(text, return_tensors="pt", padding=True))


def test_images_without_cls_are_scored_by_received_attention_and_laid_out(model_and_tokenizer):
    model, _ = model_and_tokenizer
    views = pixels(1, 3)
    sizes = torch.tensor([[50, 120]])  # wide: a 1 x 2 crop grid
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=views, image_sizes=sizes).pooler_output[0]
        direct = visionzip.compress(model.model.vision_tower, views[0], CompressionConfig.parse(SPEC))
        projected = model.model.multi_modal_projector(direct.tokens)
    assert not direct.has_cls and not direct.cls_kept
    assert direct.keep_indices.shape == (3, 6)  # 6 dominant patches, no CLS slot
    crops = CompressedTokens(projected[1:], direct.keep_indices[1:], False, False)
    torch.testing.assert_close(features, torch.cat([projected[0], official_anyres_layout(crops, 1, 2, 8)]))
    assert features.shape[0] == onevision.image_counts(model, CompressionConfig.parse(SPEC).settings, {"image_sizes": sizes})[0] == 24


def test_batched_images_equal_one_by_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = CompressionConfig.parse(SPEC).settings
    views, sizes = pixels(2, 3, seed=1), torch.tensor([[50, 120], [120, 50]])
    counts = onevision.image_counts(model, settings, {"image_sizes": sizes})
    batch = {**prompt_ids(tokenizer, "<image>", counts), "pixel_values": views, "image_sizes": sizes}
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        batched_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for row in range(2):
            single = {**prompt_ids(tokenizer, "<image>", counts[row : row + 1]),
                      "pixel_values": views[row : row + 1], "image_sizes": sizes[row : row + 1]}
            torch.testing.assert_close(model(**single).logits[:, -1], batched[row : row + 1], atol=1e-4, rtol=1e-4)
            assert model.generate(**single, max_new_tokens=3, do_sample=False)[:, -3:].tolist() == batched_tokens[row : row + 1].tolist()


def test_multi_image_sample_and_per_frame_video(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = CompressionConfig.parse(SPEC).settings
    sizes = torch.tensor([[50, 120], [120, 50]])
    assert onevision.image_counts(model, settings, {"image_sizes": sizes, "batch_num_images": [2]}) == [8, 8]
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=pixels(2, 3), image_sizes=sizes, batch_num_images=[2]
        ).pooler_output
    assert [f.shape[0] for f in features] == [8, 8]
    clips = pixels(2, 4, seed=2)
    with torch.no_grad():
        video = model.model.get_video_features(pixel_values_videos=clips).pooler_output
        frames = visionzip.compress(model.model.vision_tower, clips.flatten(0, 1), CompressionConfig.parse(SPEC))
        expected = model.model.multi_modal_projector(frames.tokens).reshape(2, 32, -1)
    assert video.shape[:2] == (2, 4 * 8 + 1)
    torch.testing.assert_close(video[:, :32], expected)
    torch.testing.assert_close(video[:, 32], model.model.image_newline.expand(2, -1))
    assert onevision.video_counts(model, settings, {"pixel_values_videos": clips}) == [33, 33]
    inputs = {**prompt_ids(tokenizer, "<video>", [33, 33]), "pixel_values_videos": clips}
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2


def test_bad_input_is_named(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="exceeds the 64 tokens"):
        visionzip.apply_compression(model, "visionzip:dominant=60,contextual=10")
    assert visionzip.hf.current_compression(model) == CompressionConfig.parse(SPEC)  # the refused one changed nothing
    clips = pixels(1, 2)
    unaware = {**prompt_ids(tokenizer, "<video>", [2 * 16 + 1]), "pixel_values_videos": clips}  # pooled vanilla count
    with pytest.raises(ValueError, match="33 video placeholder tokens but visionzip.* gives 17 video features"):
        model(**unaware)
