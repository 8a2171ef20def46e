"""``transformers.LlavaNextForConditionalGeneration`` (llava-hf LLaVA-NeXT / v1.6 checkpoints).

Each image is a base view plus a grid of crops (anyres). All views go through the tower in one pass and
each view is compressed on its own to ``tokens_per_view`` tokens (the budget is per crop, as in the
VisionZip paper's NeXT tables). The views are then laid out as the official VisionZip LLaVA-NeXT code
does (``visionzip.official_anyres_layout``, documented in docs/visionzip.md): the base view's tokens,
then the kept tokens of all crops in row-major order of the full patch grid, each crop's CLS, then all
crops' merged tokens; no unpad and no ``image_newline``. An image with a rows x cols grid therefore
becomes ``(1 + rows * cols) * tokens_per_view`` features, which is what the compression-aware processor
writes as its placeholder count.

Grid orientation: HF's ``image_sizes`` are (height, width) and its ``image_grid_pinpoints`` are
(height, width) pairs, so ``get_anyres_image_grid_shape`` returns (rows, cols). The original LLaVA reads
pinpoints as (width, height); ``python -m llava.convert`` transposes them when it writes a llava-hf config.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..anyres import official_anyres_layout
from ..methods import CompressedTokens
from .base import HFFamily, Modality, fixed_count, register_family, vision_settings
from .llava import feature_layer, project, tower_adapter, view_tokens


def grid_shape(model, image_size) -> tuple[int, int]:
    """(rows, cols) of the crop grid for an image of ``image_size`` (height, width)."""
    size = image_size.tolist() if isinstance(image_size, torch.Tensor) else list(image_size)
    return get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)


def check(model, config) -> None:
    settings = vision_settings(config)
    if config.anyres_layout != "official":
        raise ValueError(
            f"anyres_layout={config.anyres_layout!r}: the Hugging Face LLaVA-NeXT adapter lays crops out as the "
            "official VisionZip code does; use anyres_layout='official'"
        )
    settings.check(tower_adapter(model), feature_layer(model))


def image_features(
    model, config, pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
):
    """pixel_values (B, max_views, 3, S, S) or (V, 3, S, S), image_sizes (B, 2) as (height, width) ->
    pooler_output: B tensors ((1 + crops_i) * T, hidden) in the official layout."""
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (height, width) per image to lay out its crops")
    settings = vision_settings(config)
    views_per_image = [
        image_size_to_num_patches(
            image_size=size.tolist() if isinstance(size, torch.Tensor) else list(size),
            grid_pinpoints=model.config.image_grid_pinpoints,
            patch_size=model.config.vision_config.image_size,
        )
        for size in image_sizes
    ]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([views[:count] for views, count in zip(pixel_values, views_per_image)], dim=0)
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, views, 3, S, S) or (views, 3, S, S), got {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] != sum(views_per_image):
        raise ValueError(
            f"image_sizes call for {sum(views_per_image)} views ({views_per_image} per image) but pixel_values "
            f"holds {pixel_values.shape[0]}"
        )
    adapter = tower_adapter(model)
    compressed = settings.encode(adapter, pixel_values, feature_layer(model, vision_feature_layer))
    features = project(model, compressed.tokens)
    out, start = [], 0
    for count, size in zip(views_per_image, image_sizes):
        part = slice(start, start + count)
        start += count
        rows, cols = grid_shape(model, size)
        crops = CompressedTokens(
            features[part][1:], compressed.keep_indices[part][1:], compressed.has_cls, compressed.cls_kept
        )
        grid = official_anyres_layout(crops, rows, cols, adapter.patches_per_side)
        out.append(torch.cat([features[part][0], grid], dim=0))
    return BaseModelOutputWithPooling(last_hidden_state=compressed.tokens, pooler_output=out)


def image_count(model, settings, image_size) -> int:
    rows, cols = grid_shape(model, image_size)
    return (1 + rows * cols) * fixed_count(settings, tower_adapter(model).num_tokens)


def placeholder_counts(model, settings, image_inputs) -> list[int]:
    return [image_count(model, settings, size) for size in image_inputs["image_sizes"]]


def expected_count(model, settings, kwargs) -> int | None:
    if kwargs.get("pixel_values") is None or kwargs.get("image_sizes") is None:
        return None
    return sum(placeholder_counts(model, settings, {"image_sizes": kwargs["image_sizes"]}))


FAMILY = register_family(
    HFFamily(
        name="llava_next",
        class_names=("LlavaNextForConditionalGeneration",),
        check=check,
        modalities=(Modality("image", image_features, placeholder_counts, expected_count),),
        llm_view_tokens=view_tokens,
    )
)
