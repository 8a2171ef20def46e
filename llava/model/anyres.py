"""LLaVA-NeXT (anyres) layouts: how the features of one image's crops become one token sequence.

Vanilla (SPEC, "NeXT feature layout"): the base image's tokens, then the crops' features arranged as one
(rows * S, cols * S) map; with ``unpad`` the rows (or columns) that show only padding are cut and
``image_newline`` follows every row; flattened row-major.

Compressed, ``anyres_layout="official"``: ``visionzip.official_anyres_layout`` (SPEC point 7).
Compressed, ``anyres_layout="spatial"``: the kept grid positions only, on the same map as vanilla (unpad
cuts the kept tokens that fall on padding), ``image_newline`` after every row that still has tokens, then
the crops' CLS tokens (when kept) and all contextual tokens.
"""
from __future__ import annotations

import torch

import visionzip
from visionzip import CompressedTokens
from visionzip.anyres import grid_positions


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
