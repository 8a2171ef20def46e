"""Video-LLaVA (transformers' class) with per-frame compression: kept tokens per frame, placeholder count
= feature count, batched = one by one, generate, bad input. Tiny random model from its config."""
from __future__ import annotations

import pytest
import torch

import visionzip
from visionzip import CompressionConfig
from visionzip.hf import compression_aware_processor
from visionzip.hf.tiny import tiny_video_llava

PROMPTS = ["USER: <video> describe it ASSISTANT:", "USER: <video> what is in the picture ASSISTANT:"]


@pytest.fixture(scope="module")
def video_llava():
    return tiny_video_llava()


def videos(batch: int, frames: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(batch, frames, 3, 112, 112, generator=generator)


def inputs_for(tokenizer, prompts, pixel_values_videos, per_video: int) -> dict:
    text = [p.replace("<video>", "<video>" * per_video) for p in prompts]
    encoded = tokenizer(text, return_tensors="pt", padding=True)
    return {**encoded, "pixel_values_videos": pixel_values_videos}


def test_per_frame_budget_gives_frames_times_tokens(video_llava):
    model, tokenizer = video_llava
    visionzip.apply_compression(model, "visionzip:17")
    try:
        clips = videos(2, 8)
        with torch.no_grad():
            features = model.model.get_video_features(pixel_values_videos=clips).pooler_output
            direct = visionzip.compress(model.model.video_tower, clips.flatten(0, 1), CompressionConfig.parse("visionzip:17"))
            expected = model.model.multi_modal_projector(direct.tokens)
        # the paper's Video-LLaVA setting: 17 per frame, 8 frames -> 136 per video
        assert features.shape[:2] == (16, 17) and features.shape[0] * features.shape[1] // 2 == 136
        torch.testing.assert_close(features, expected)
        inputs = inputs_for(tokenizer, PROMPTS, clips, 136)
        assert (inputs["input_ids"] == model.config.video_token_id).sum(1).tolist() == [136, 136]
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    finally:
        visionzip.apply_compression(model, "none")


def test_batched_videos_equal_one_by_one(video_llava):
    model, tokenizer = video_llava
    visionzip.apply_compression(model, "vispruner:12")
    try:
        clips = videos(2, 4)
        batch = inputs_for(tokenizer, PROMPTS, clips, 4 * 12)
        with torch.no_grad():
            batched = model(**batch).logits[:, -1]
            batched_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
            for row in range(2):
                single = inputs_for(tokenizer, PROMPTS[row : row + 1], clips[row : row + 1], 4 * 12)
                torch.testing.assert_close(model(**single).logits[:, -1], batched[row : row + 1], atol=1e-4, rtol=1e-4)
                tokens = model.generate(**single, max_new_tokens=3, do_sample=False)[:, -3:]
                assert tokens.tolist() == batched_tokens[row : row + 1].tolist()
    finally:
        visionzip.apply_compression(model, "none")


def test_images_and_the_processor_hooks(video_llava):
    model, tokenizer = video_llava

    class Processor:
        """Stand-in with VideoLlavaProcessor's placeholder hooks (its video processor needs torchvision)."""

        image_token, video_token = "<image>", "<video>"

        def replace_image_token(self, inputs, image_idx):
            return self.image_token * 64

        def replace_video_token(self, inputs, video_idx):
            return self.video_token * (len(inputs["pixel_values_videos"][video_idx]) * 65)

    processor = Processor()
    visionzip.apply_compression(model, "visionzip:dominant=8,contextual=2")
    try:
        aware = compression_aware_processor(processor, model)
        assert aware.replace_video_token({"pixel_values_videos": videos(1, 8)}, video_idx=0) == "<video>" * 80
        assert aware.replace_image_token({"pixel_values": torch.zeros(2, 3, 112, 112)}, image_idx=1) == "<image>" * 10
        assert processor.replace_video_token({"pixel_values_videos": videos(1, 8)}, video_idx=0) == "<video>" * (8 * 65)
        images = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=images).pooler_output
        assert features.shape[:2] == (2, 10)
        text = ["USER: " + "<image>" * 10 + " describe it ASSISTANT:"] * 2
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt", padding=True), pixel_values=images).logits
        assert torch.isfinite(logits).all()
    finally:
        visionzip.apply_compression(model, "none")


def test_bad_input_is_named(video_llava):
    model, tokenizer = video_llava
    with pytest.raises(ValueError, match="exceeds the 65 tokens"):
        visionzip.apply_compression(model, "visionzip:dominant=60,contextual=10")
    visionzip.apply_compression(model, "visionzip:17")
    try:
        clips = videos(1, 2)
        unaware = inputs_for(tokenizer, PROMPTS[:1], clips, 2 * 65)  # what an unaware processor writes
        with pytest.raises(ValueError, match="130 video placeholder tokens but visionzip.* gives 34 video features"):
            model(**unaware)
    finally:
        visionzip.apply_compression(model, "none")
