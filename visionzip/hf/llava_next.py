"""``transformers.LlavaNextForConditionalGeneration`` (llava-hf LLaVA-NeXT / v1.6 checkpoints).

Each image is a base view plus a grid of crops (anyres). All views go through the tower in one pass and
each view is compressed on its own to ``tokens_per_view`` tokens (the budget is per crop, as in the
VisionZip paper's NeXT tables), through ``visionzip.pipeline``'s stages on this family's tower, projector
and crop grids. The views are then laid out in the config's ``anyres_layout``:

- ``official`` (the default): as the official VisionZip LLaVA-NeXT code does
  (``visionzip.official_anyres_layout``, documented in docs/visionzip.md): the base view's tokens, then the
  kept tokens of all crops in row-major order of the full patch grid, each crop's CLS, then all crops'
  merged tokens; no unpad and no ``image_newline``. An image with a rows x cols grid becomes
  ``(1 + rows * cols) * tokens_per_view`` features, which is what the compression-aware processor writes as
  its placeholder count.
- ``spatial``: LLaVA-NeXT's own map, as our LLaVA lays out ``spatial_unpad`` checkpoints (the kept crop
  tokens on the unpadded (rows * S, cols * S) grid, ``image_newline`` after every row that keeps any, then
  CLS and merged tokens; ``visionzip.anyres.compressed_spatial_layout``), so a checkpoint converted with
  ``python -m llava.convert`` gives the same tokens in both paths. How many kept tokens fall on the image
  rather than its padding depends on the positions the method keeps, so the compression-aware processor
  runs the tower and the method once on the processed pixels to count them (``spatial_counts``); the
  model's forward runs them again (one more tower pass per prompt, the price of this layout on a processor
  that writes placeholders before the model runs).

Grid orientation: HF's ``image_sizes`` are (height, width) and its ``image_grid_pinpoints`` are
(height, width) pairs, so ``get_anyres_image_grid_shape`` returns (rows, cols). The original LLaVA reads
pinpoints as (width, height); ``python -m llava.convert`` transposes them when it writes a llava-hf config.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..pipeline import CropGrid, encode_views, layout_images, placeholder_count
from .base import HFFamily, Modality, current_compression, fixed_count, register_family, vision_settings
from .llava import feature_layer, project, tower_adapter, view_tokens

NEXT_LAYOUTS = ("official", "spatial")

# inner model -> (the processor's image inputs last counted, their counts): a processor asks once per image
_SPATIAL_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _size(size) -> list[int]:
    return size.tolist() if isinstance(size, torch.Tensor) else [int(v) for v in size]


def grid_shape(model, image_size) -> tuple[int, int]:
    """(rows, cols) of the crop grid for an image of ``image_size`` (height, width)."""
    return get_anyres_image_grid_shape(_size(image_size), model.config.image_grid_pinpoints,
                                       model.config.vision_config.image_size)


def crop_grid(model, image_size) -> CropGrid:
    """The ``visionzip.pipeline.CropGrid`` of an image of ``image_size`` (height, width)."""
    rows, cols = grid_shape(model, image_size)
    height, width = _size(image_size)
    return CropGrid(rows, cols, tower_adapter(model).patches_per_side, (width, height))


def views_per_image(model, image_sizes) -> list[int]:
    return [
        image_size_to_num_patches(
            image_size=_size(size), grid_pinpoints=model.config.image_grid_pinpoints,
            patch_size=model.config.vision_config.image_size,
        )
        for size in image_sizes
    ]


def check(model, config) -> None:
    settings = vision_settings(config)
    if config.anyres_layout not in NEXT_LAYOUTS:
        raise ValueError(f"anyres_layout={config.anyres_layout!r}: the LLaVA-NeXT adapter lays crops out as {NEXT_LAYOUTS}")
    if config.anyres_layout == "spatial" and getattr(model.model, "image_newline", None) is None:
        raise ValueError("anyres_layout='spatial' needs the model's image_newline (LLaVA-NeXT's spatial_unpad)")
    settings.check(tower_adapter(model), feature_layer(model))


def _stacked_views(model, pixel_values, image_sizes) -> tuple[torch.Tensor, list[int]]:
    """pixel_values (B, max_views, 3, S, S) or (V, 3, S, S) -> the images' views (sum V_i, 3, S, S), V_i."""
    counts = views_per_image(model, image_sizes)
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([views[:count] for views, count in zip(pixel_values, counts)], dim=0)
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, views, 3, S, S) or (views, 3, S, S), got {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] != sum(counts):
        raise ValueError(
            f"image_sizes call for {sum(counts)} views ({counts} per image) but pixel_values holds {pixel_values.shape[0]}"
        )
    return pixel_values, counts


def image_features(
    model, config, pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
):
    """pixel_values (B, max_views, 3, S, S) or (V, 3, S, S), image_sizes (B, 2) as (height, width) ->
    pooler_output: B tensors (N_i, hidden) in the ``anyres_layout`` of ``config``."""
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (height, width) per image to lay out its crops")
    views, counts = _stacked_views(model, pixel_values, image_sizes)
    encoded = encode_views(tower_adapter(model), views, feature_layer(model, vision_feature_layer), vision_settings(config))
    spatial = config.anyres_layout == "spatial"
    out = layout_images(
        project(model, encoded), counts, config.anyres_layout, [crop_grid(model, size) for size in image_sizes],
        model.model.image_newline if spatial else None,
    )
    return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=out)


def spatial_counts(model, settings, image_inputs) -> list[int]:
    """Placeholders per image in the spatial layout: the tower and the method run on the processed pixels
    (all images in one pass, as the model's forward runs them) and the kept crop positions are counted."""
    inner = model.model
    last = _SPATIAL_COUNTS.get(inner)
    if last is not None and last[0] is image_inputs:
        return last[1]
    sizes = image_inputs["image_sizes"]
    pixels = image_inputs["pixel_values"]
    if not isinstance(pixels, torch.Tensor):  # a processor asked for no tensors: one array of views per image
        pixels = torch.cat([torch.as_tensor(np.asarray(p))[:n] for p, n in zip(pixels, views_per_image(model, sizes))])
    adapter = tower_adapter(model)
    weight = next(inner.vision_tower.parameters())
    views, counts = _stacked_views(model, pixels.to(weight.device, weight.dtype), sizes)
    with torch.no_grad():
        encoded = encode_views(adapter, views, feature_layer(model), settings)
    per_view = fixed_count(settings, adapter.num_tokens)
    out, start = [], 0
    for count, size in zip(counts, sizes):
        kept = encoded.slice(start + 1, start + count).compressed
        out.append(placeholder_count("spatial", count, per_view, crop_grid(model, size), newline=True, kept=kept))
        start += count
    _SPATIAL_COUNTS[inner] = (image_inputs, out)
    return out


def placeholder_counts(model, settings, image_inputs) -> list[int]:
    if current_compression(model).anyres_layout == "spatial":
        return spatial_counts(model, settings, image_inputs)
    per_view = fixed_count(settings, tower_adapter(model).num_tokens)
    sizes = image_inputs["image_sizes"]
    return [
        placeholder_count("official", count, per_view, crop_grid(model, size))
        for count, size in zip(views_per_image(model, sizes), sizes)
    ]


def expected_count(model, settings, kwargs) -> int | None:
    """The placeholders the forward's pixels need; None for the spatial layout, whose count is known once
    the pixels are encoded (transformers' own placeholder check compares it with the features then)."""
    if kwargs.get("pixel_values") is None or kwargs.get("image_sizes") is None:
        return None
    if current_compression(model).anyres_layout == "spatial":
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
