"""LLaVA-NeXT (anyres): the crop-grid geometry and every layout of one image's crops as one token sequence.

Grid geometry (``select_best_resolution``, ``get_anyres_image_grid_shape``): as the original LLaVA-NeXT
(haotian-liu/LLaVA ``llava/mm_utils.py``), documented in docs/llava.md.

Vanilla (docs/llava.md, "NeXT feature layout"): the base image's tokens, then the crops' features arranged as one
(rows * S, cols * S) map; with ``unpad`` the rows (or columns) that show only padding are cut and
``image_newline`` follows every row; flattened row-major.

Compressed, ``anyres_layout="official"``: ``visionzip.official_anyres_layout`` (the official VisionZip
order, docs/visionzip.md).
Compressed, ``anyres_layout="spatial"``: the kept grid positions only, on the same map as vanilla (unpad
cuts the kept tokens that fall on padding), ``image_newline`` after every row that still has tokens, then
the crops' CLS tokens (when kept) and all contextual tokens.
"""
from __future__ import annotations

import ast
import dataclasses
import math

import torch

import visionzip
from visionzip import CompressedTokens
from visionzip.anyres import grid_positions


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


def unpad_bounds(height: int, width: int, original_size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a (height, width) feature map that shows the image of
    ``original_size`` (width, height) and not the padding around it."""
    original_width, original_height = original_size
    if original_width / original_height > width / height:
        new_height = int(original_height * (width / original_width))
        padding = (height - new_height) // 2
        return padding, height - padding, 0, width
    new_width = int(original_width * (height / original_height))
    padding = (width - new_width) // 2
    return 0, height, padding, width - padding


def unpad_image(tensor: torch.Tensor, original_size) -> torch.Tensor:
    """tensor (C, H, W) -> the rows (or columns) that show the image, padding removed."""
    top, bottom, left, right = unpad_bounds(tensor.shape[1], tensor.shape[2], original_size)
    return tensor[:, top:bottom, left:right]


def spatial_features(
    crops: torch.Tensor,
    grid_rows: int,
    grid_cols: int,
    side: int,
    image_size,
    newline: torch.Tensor | None,
) -> torch.Tensor:
    """Vanilla layout of the crops (not the base image): crops (rows * cols, side * side, C) -> (N, C).

    ``newline`` given: unpad, and append it after every row (``spatial_unpad``); None: plain ``spatial``.
    """
    channels = crops.shape[-1]
    grid = crops.view(grid_rows, grid_cols, side, side, channels).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(grid_rows * side, grid_cols * side, channels)
    if newline is None:
        return grid.reshape(-1, channels)
    top, bottom, left, right = unpad_bounds(grid.shape[0], grid.shape[1], image_size)
    grid = grid[top:bottom, left:right]
    ends = newline.to(grid.dtype).view(1, 1, channels).expand(grid.shape[0], 1, channels)
    return torch.cat([grid, ends], dim=1).reshape(-1, channels)


def official_layout(crops: CompressedTokens, grid_rows: int, grid_cols: int, side: int) -> torch.Tensor:
    """The official VisionZip order of the compressed crops (not the base image) -> (K * T, C)."""
    return visionzip.official_anyres_layout(crops, grid_rows, grid_cols, side)


def compressed_spatial_layout(
    crops: CompressedTokens,
    grid_rows: int,
    grid_cols: int,
    side: int,
    image_size,
    newline: torch.Tensor | None,
) -> torch.Tensor:
    """The kept grid tokens in row-major order of the (unpadded) map, ``newline`` after every row that
    still has tokens (when given; it also turns on unpad), then the crops' CLS tokens and contextual tokens."""
    tokens, keep = crops.tokens, crops.keep_indices
    channels = tokens.shape[-1]
    first_patch = int(crops.cls_kept)
    rows, cols = grid_positions(keep[:, first_patch:], crops.has_cls, grid_rows, grid_cols, side)
    rows, cols = rows.flatten(), cols.flatten()
    grid_tokens = tokens[:, first_patch : crops.num_kept].reshape(-1, channels)
    if newline is not None:
        top, bottom, left, right = unpad_bounds(grid_rows * side, grid_cols * side, image_size)
        inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        rows, cols, grid_tokens = rows[inside], cols[inside], grid_tokens[inside]
    order = (rows * (grid_cols * side) + cols).argsort()
    rows, grid_tokens = rows[order], grid_tokens[order]
    parts = [grid_tokens]
    if newline is not None and rows.numel():
        row_end = torch.ones_like(rows, dtype=torch.bool)
        row_end[:-1] = rows[1:] != rows[:-1]
        ends = row_end.long()
        token_slot = torch.arange(rows.numel(), device=rows.device) + ends.cumsum(0) - ends
        out = grid_tokens.new_empty(rows.numel() + int(ends.sum()), channels)
        out[token_slot] = grid_tokens
        out[token_slot[row_end] + 1] = newline.to(out.dtype)
        parts = [out]
    if crops.cls_kept:
        parts.append(tokens[:, 0])
    parts.append(tokens[:, crops.num_kept :].reshape(-1, channels))
    return torch.cat(parts, dim=0)


def anyres_image_features(
    features: torch.Tensor,
    compressed: CompressedTokens | None,
    image_size,
    newline: torch.Tensor | None,
    layout: str,
    image_aspect_ratio: str | None,
    grid_pinpoints,
    image_size_px: int | None = None,
    side: int | None = None,
) -> torch.Tensor:
    """One anyres image: features (1 + K, T, hidden) of its base view and K crops -> (N, hidden).

    ``compressed``: the views' ``CompressedTokens`` (kept positions) or None (vanilla). ``newline``: the
    learned ``image_newline`` for ``spatial_unpad``, None for ``spatial``. ``layout``: the compressed
    anyres layout ("official" or "spatial"). ``image_size_px`` / ``side``: the tower's input side and
    patches per side.
    """
    base = features[0]
    if features.shape[0] == 1:
        return base if newline is None else torch.cat([base, newline[None].to(base.dtype)], dim=0)
    if image_aspect_ratio != "anyres":
        raise ValueError(f"{features.shape[0]} views per image need image_aspect_ratio 'anyres', not {image_aspect_ratio!r}")
    grid_cols, grid_rows = get_anyres_image_grid_shape(image_size, grid_pinpoints, image_size_px)
    if grid_rows * grid_cols != features.shape[0] - 1:
        raise ValueError(
            f"image of size {tuple(image_size)} has a {grid_rows} x {grid_cols} crop grid but "
            f"{features.shape[0] - 1} crops were given"
        )
    if compressed is None:
        if base.shape[0] != side * side:
            raise ValueError(
                f"the spatial layout needs {side * side} patch tokens per view, got {base.shape[0]} "
                "(mm_vision_select_feature must be 'patch')"
            )
        return torch.cat([base, spatial_features(features[1:], grid_rows, grid_cols, side, image_size, newline)])
    merged = compressed.merged_indices
    crops = dataclasses.replace(compressed, tokens=features[1:], keep_indices=compressed.keep_indices[1:],
                                merged_indices=None if merged is None else merged[1:])
    if layout == "official":
        grid = official_layout(crops, grid_rows, grid_cols, side)
    else:
        grid = compressed_spatial_layout(crops, grid_rows, grid_cols, side, image_size, newline)
    return torch.cat([base, grid], dim=0)
