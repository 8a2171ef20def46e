"""LLaVA-NeXT (anyres) as our LLaVA reads it: the crop-grid geometry of an image.

Grid geometry (``select_best_resolution``, ``get_anyres_image_grid_shape``, ``crop_grid``): as the original
LLaVA-NeXT (haotian-liu/LLaVA ``llava/mm_utils.py``; pinpoints and image sizes as (width, height)),
documented in docs/llava.md. The layouts of an image's crops (vanilla, official, spatial; docs/llava.md
"NeXT feature layout", docs/visionzip.md) are model-agnostic tensor code in ``visionzip.anyres``, run
through ``visionzip.pipeline``; they are re-exported here under the names this module had.
"""
from __future__ import annotations

import ast
import math

import torch

from visionzip.anyres import compressed_spatial_layout, official_anyres_layout, unpad_bounds
from visionzip.anyres import spatial_grid_layout as spatial_features
from visionzip.pipeline import CropGrid

__all__ = [
    "compressed_spatial_layout",
    "crop_grid",
    "get_anyres_image_grid_shape",
    "official_anyres_layout",
    "parse_grid_pinpoints",
    "select_best_resolution",
    "spatial_features",
    "unpad_bounds",
    "unpad_image",
]


def parse_grid_pinpoints(grid_pinpoints) -> list[tuple[int, int]]:
    """``image_grid_pinpoints`` as a list of (width, height): a list, or its string literal."""
    if isinstance(grid_pinpoints, str):
        try:
            grid_pinpoints = ast.literal_eval(grid_pinpoints)
        except (ValueError, SyntaxError) as err:
            raise ValueError(
                f"image_grid_pinpoints {grid_pinpoints!r} is not a list literal such as [[336, 672], [672, 336]]"
            ) from err
    try:
        pinpoints = [(int(w), int(h)) for w, h in grid_pinpoints]
    except (TypeError, ValueError) as err:
        raise ValueError(f"image_grid_pinpoints must be (width, height) pairs, got {grid_pinpoints!r}") from err
    if not pinpoints:
        raise ValueError("image_grid_pinpoints is empty")
    return pinpoints


def select_best_resolution(original_size, possible_resolutions) -> tuple[int, int]:
    """Among ``possible_resolutions`` (width, height), the one that keeps the most of the image's
    resolution once it is fitted inside (effective area), ties broken by the least wasted area."""
    original_width, original_height = original_size
    best, best_effective, best_wasted = None, -1, math.inf
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled = int(original_width * scale) * int(original_height * scale)
        effective = min(scaled, original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (width, height), effective, wasted
    return best


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """(columns, rows) of crops for an image of ``image_size`` (width, height)."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints))
    return width // patch_size, height // patch_size


def unpad_image(tensor: torch.Tensor, original_size) -> torch.Tensor:
    """tensor (C, H, W) -> the rows (or columns) that show the image, padding removed."""
    top, bottom, left, right = unpad_bounds(tensor.shape[1], tensor.shape[2], original_size)
    return tensor[:, top:bottom, left:right]


def crop_grid(image_size, grid_pinpoints, image_size_px: int, side: int) -> CropGrid:
    """The crop grid of an image of ``image_size`` (width, height) for a tower of ``image_size_px`` input
    pixels and ``side`` patches per side, as the original LLaVA-NeXT picks it (pinpoints as (width, height))."""
    grid_cols, grid_rows = get_anyres_image_grid_shape(image_size, grid_pinpoints, image_size_px)
    return CropGrid(grid_rows, grid_cols, side, tuple(int(v) for v in image_size))
