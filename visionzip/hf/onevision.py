"""``transformers.LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision): a SigLIP tower (no CLS
token, so VisionZip scores by the mean attention each token receives, paper appendix A.2), anyres images,
multi-image samples and videos.

- Single-image samples: base view + crop grid, every view compressed to ``tokens_per_view`` and laid out
  as the official VisionZip LLaVA-NeXT code lays out crops (``visionzip.pipeline``'s ``official`` layout; no
  unpad, no ``image_newline``, no anyres_max downsampling, which compression replaces):
  ``(1 + rows * cols) * tokens_per_view`` features.
- Multi-image samples (``batch_num_images`` > 1): one view per image, ``tokens_per_view`` each.
- Videos: all frames through the tower in one pass, each frame compressed on its own (the budget is per
  frame; compression replaces OneVision's 2x2 frame pooling), frames in order, then the one
  ``image_newline`` OneVision puts after a video: ``frames * tokens_per_view + 1`` features.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..pipeline import CropGrid, encode_views, layout_images, placeholder_count
from .base import HFFamily, Modality, fixed_count, register_family, vision_settings
from .llava import feature_layer, project, tower_adapter, view_tokens


def _size(size) -> list[int]:
    return size.tolist() if isinstance(size, torch.Tensor) else list(size)


def check(model, config) -> None:
    settings = vision_settings(config)
    if config.anyres_layout != "official":
        raise ValueError(
            f"anyres_layout={config.anyres_layout!r}: the Hugging Face OneVision adapter lays crops out as the "
            "official VisionZip NeXT code does; use anyres_layout='official'"
        )
    settings.check(tower_adapter(model), feature_layer(model))


def _grid(model, size, side: int) -> CropGrid:
    """The crop grid of an image of ``size`` (height, width)."""
    rows, cols = get_anyres_image_grid_shape(_size(size), model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    height, width = _size(size)
    return CropGrid(rows, cols, side, (width, height))


def _views(model, image_sizes, batch_num_images) -> list[int]:
    """Views per image: base + crops for single-image samples, 1 in multi-image samples."""
    single = [True] * len(image_sizes) if batch_num_images is None else [n == 1 for n in batch_num_images for _ in range(n)]
    if len(single) != len(image_sizes):
        raise ValueError(f"batch_num_images {list(batch_num_images)} does not add up to {len(image_sizes)} images")
    return [
        image_size_to_num_patches(_size(size), model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        if one else 1
        for size, one in zip(image_sizes, single)
    ]


def image_features(
    model, config, pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None,
    vision_aspect_ratio=None, batch_num_images=None, **kwargs,
):
    """pixel_values (B, max_views, 3, S, S), image_sizes (B, 2) (height, width) -> B tensors (T_i, hidden)."""
    if image_sizes is None:
        raise ValueError("LLaVA-OneVision needs image_sizes (height, width) per image")
    views = _views(model, image_sizes, batch_num_images)
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, views)], dim=0)
    adapter = tower_adapter(model)
    encoded = encode_views(adapter, pixel_values, feature_layer(model, vision_feature_layer), vision_settings(config))
    grids = [_grid(model, size, adapter.patches_per_side) if count > 1 else None for count, size in zip(views, image_sizes)]
    out = layout_images(project(model, encoded), views, "official", grids)
    return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=out)


def video_features(model, config, pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
    """pixel_values_videos (B, F, 3, S, S) -> pooler_output (B, F * T + 1, hidden)."""
    if pixel_values_videos.dim() != 5:
        raise ValueError(f"pixel_values_videos must be (B, frames, 3, S, S), got {tuple(pixel_values_videos.shape)}")
    batch, frames = pixel_values_videos.shape[:2]
    encoded = encode_views(
        tower_adapter(model), pixel_values_videos.flatten(0, 1), feature_layer(model, vision_feature_layer),
        vision_settings(config),
    )
    features = project(model, encoded).tokens.reshape(batch, -1, model.config.text_config.hidden_size)
    newline = model.model.image_newline[None, None].expand(batch, 1, -1).to(features.dtype)
    return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=torch.cat([features, newline], dim=1))


def _per_view(model, settings) -> int:
    return fixed_count(settings, tower_adapter(model).num_tokens)


def image_counts(model, settings, inputs) -> list[int]:
    sizes = inputs["image_sizes"]
    views = _views(model, sizes, inputs.get("batch_num_images"))
    side = tower_adapter(model).patches_per_side
    return [
        placeholder_count("official", n, _per_view(model, settings), _grid(model, size, side) if n > 1 else None)
        for n, size in zip(views, sizes)
    ]


def image_expected(model, settings, kwargs) -> int:
    return sum(image_counts(model, settings, kwargs))


def video_counts(model, settings, inputs) -> list[int]:
    # frames in order, then the one image_newline OneVision puts after a video
    return [placeholder_count("flat", len(video), _per_view(model, settings)) + 1 for video in inputs["pixel_values_videos"]]


def video_expected(model, settings, kwargs) -> int:
    return sum(video_counts(model, settings, kwargs))


FAMILY = register_family(
    HFFamily(
        name="onevision",
        class_names=("LlavaOnevisionForConditionalGeneration",),
        check=check,
        modalities=(
            Modality("image", image_features, image_counts, image_expected),
            Modality(
                "video", video_features, video_counts, video_expected,
                method="get_video_features", pixels="pixel_values_videos", token_id="video_token_id",
            ),
        ),
        llm_view_tokens=view_tokens,  # SigLIP: no CLS, the patches of a view or a frame
    )
)
