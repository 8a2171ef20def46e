"""``transformers.VideoLlavaForConditionalGeneration`` (Video-LLaVA): images through ``image_tower``,
videos through ``video_tower``, both CLIP, one projector.

Videos: all frames of all videos go through the video tower in one pass and each frame is compressed on
its own to ``tokens_per_view`` tokens: the budget is per frame, as in the VisionZip paper's Video-LLaVA
table (8 frames x 256 tokens; ``visionzip:17`` keeps 17 per frame, 136 per video). Video-LLaVA feeds all
257 tokens of a frame (CLS included) to the LLM; a frame's compressed tokens are the method's (VisionZip
keeps CLS among its dominant tokens). A video of F frames becomes ``F * tokens_per_view`` features, in
frame order. Images: as LLaVA-1.5 (``visionzip/hf/llava.py``), through the image tower. Both are
``visionzip.pipeline``'s stages (``flat`` layout) on the tower of their input.
"""
from __future__ import annotations

from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..encoders import encoder_adapter
from ..pipeline import encode_views, placeholder_count
from .base import HFFamily, Modality, fixed_count, register_family, single_layer, vision_settings
from .llava import project


def _layer(model, vision_feature_layer=None) -> int:
    layer = model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    return single_layer(layer, type(model).__name__)


def check(model, config) -> None:
    settings = vision_settings(config)
    for tower in (model.model.image_tower, model.model.video_tower):
        settings.check(encoder_adapter(tower), _layer(model))


def image_features(model, config, pixel_values=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
    """pixel_values (B, 3, S, S) -> pooler_output (B, T, hidden)."""
    if pixel_values is None:
        pixel_values = kwargs.get("pixel_values_images")
    encoded = encode_views(
        encoder_adapter(model.model.image_tower), pixel_values, _layer(model, vision_feature_layer), vision_settings(config)
    )
    return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=project(model, encoded).tokens)


def video_features(model, config, pixel_values_videos, vision_feature_layer=None, **kwargs):
    """pixel_values_videos (B, F, 3, S, S) -> pooler_output (B * F, T, hidden), frames in order."""
    if pixel_values_videos.dim() != 5:
        raise ValueError(f"pixel_values_videos must be (B, frames, 3, S, S), got {tuple(pixel_values_videos.shape)}")
    frames = pixel_values_videos.flatten(0, 1)
    encoded = encode_views(
        encoder_adapter(model.model.video_tower), frames, _layer(model, vision_feature_layer), vision_settings(config)
    )
    return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=project(model, encoded).tokens)


def _per_view(model, settings, tower) -> int:
    return fixed_count(settings, encoder_adapter(tower).num_tokens)


def image_counts(model, settings, inputs) -> list[int]:
    images = inputs.get("pixel_values", inputs.get("pixel_values_images"))
    return [placeholder_count("flat", 1, _per_view(model, settings, model.model.image_tower))] * len(images)


def image_expected(model, settings, kwargs) -> int:
    return kwargs["pixel_values"].shape[0] * _per_view(model, settings, model.model.image_tower)


def video_counts(model, settings, inputs) -> list[int]:
    per_frame = _per_view(model, settings, model.model.video_tower)
    return [placeholder_count("flat", len(video), per_frame) for video in inputs["pixel_values_videos"]]


def video_expected(model, settings, kwargs) -> int:
    videos = kwargs["pixel_values_videos"]
    return videos.shape[0] * videos.shape[1] * _per_view(model, settings, model.model.video_tower)


FAMILY = register_family(
    HFFamily(
        name="video_llava",
        class_names=("VideoLlavaForConditionalGeneration",),
        check=check,
        modalities=(
            Modality("image", image_features, image_counts, image_expected),
            Modality(
                "video", video_features, video_counts, video_expected,
                method="get_video_features", pixels="pixel_values_videos", token_id="video_token_id",
            ),
        ),
        # a video frame's tokens, CLS included (the papers' Video-LLaVA setting; an image has one fewer)
        llm_view_tokens=lambda model: encoder_adapter(model.model.video_tower).num_tokens,
    )
)
