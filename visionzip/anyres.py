"""LLaVA-NeXT (anyres) layouts of one image's crop tokens, as pure tensor functions.

An anyres image is a base view plus ``rows x cols`` crops of ``S x S`` patches each (crops row by row). The
layouts of the crops (the base view's tokens, which come first, are the caller's; ``visionzip.pipeline``
puts them together):

- **official** (``official_anyres_layout``), as the official VisionZip code (dvlab-research/VisionZip at
  3151f6d, its LLaVA-NeXT path) lays out compressed crops (docs/visionzip.md, "LLaVA-NeXT"): the kept
  (non-CLS) dominant tokens of all crops put back on the full (rows * S, cols * S) patch grid and emitted in
  row-major order of that grid; then each crop's CLS token (crop order); then all crops' contextual tokens
  (crop order). No ``unpad`` and no ``image_newline``.
- **spatial**, LLaVA-NeXT's own map (docs/llava.md, "NeXT feature layout"): vanilla
  (``spatial_grid_layout``), the crops arranged as one (rows * S, cols * S) map; with a ``newline`` the rows
  (or columns) that show only padding are cut (``unpad``) and the newline follows every row; row-major.
  Compressed (``compressed_spatial_layout``): the kept grid positions only, on the same map (unpad cuts the
  kept tokens that fall on padding), the newline after every row that still has tokens, then the crops' CLS
  tokens (when kept) and all merged tokens. Its length then depends on which positions were kept
  (``compressed_spatial_count``).
"""
from __future__ import annotations

import torch

from .methods.base import CompressedTokens


def grid_positions(
    keep: torch.Tensor, has_cls: bool, grid_rows: int, grid_cols: int, patches_per_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column on the full (rows * S, cols * S) grid of kept patch positions.

    keep: (K, D) encoder positions of K = rows * cols crops (crops row by row) -> rows, cols (K, D).
    """
    num_crops = keep.shape[0]
    if num_crops != grid_rows * grid_cols:
        raise ValueError(f"{num_crops} crops do not fill a {grid_rows} x {grid_cols} grid")
    patch = keep - int(has_cls)
    crop = torch.arange(num_crops, device=keep.device).unsqueeze(1)
    rows = (crop // grid_cols) * patches_per_side + patch // patches_per_side
    cols = (crop % grid_cols) * patches_per_side + patch % patches_per_side
    return rows, cols


def unpad_bounds(height: int, width: int, original_size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a (height, width) feature map that shows the image of
    ``original_size`` (width, height) and not the padding around it (the original LLaVA-NeXT's ``unpad_image``,
    haotian-liu/LLaVA ``llava/mm_utils.py``, on bounds instead of a tensor)."""
    original_width, original_height = original_size
    if original_width / original_height > width / height:
        new_height = int(original_height * (width / original_width))
        padding = (height - new_height) // 2
        return padding, height - padding, 0, width
    new_width = int(original_width * (height / original_height))
    padding = (width - new_width) // 2
    return 0, height, padding, width - padding


def official_anyres_layout(
    crops: CompressedTokens, grid_rows: int, grid_cols: int, patches_per_side: int
) -> torch.Tensor:
    """crops.tokens: (K, T, C) for K = grid_rows * grid_cols crops -> (K * T, C) in the official order."""
    tokens, keep = crops.tokens, crops.keep_indices
    channels = tokens.shape[-1]
    first_patch = int(crops.cls_kept)
    patch_keep = keep[:, first_patch:]
    patch_tokens = tokens[:, first_patch : crops.num_kept]
    rows, cols = grid_positions(patch_keep, crops.has_cls, grid_rows, grid_cols, patches_per_side)
    order = (rows * (grid_cols * patches_per_side) + cols).flatten().argsort()
    parts = [patch_tokens.reshape(-1, channels)[order]]
    if crops.cls_kept:
        parts.append(tokens[:, 0])
    parts.append(tokens[:, crops.num_kept :].reshape(-1, channels))
    return torch.cat(parts, dim=0)


def spatial_grid_layout(
    crops: torch.Tensor, grid_rows: int, grid_cols: int, side: int, image_size, newline: torch.Tensor | None
) -> torch.Tensor:
    """Vanilla spatial layout of the crops (not the base image): crops (rows * cols, side * side, C) -> (N, C).

    ``newline`` (C,) given: unpad to ``image_size`` (width, height), and append it after every row
    (``spatial_unpad``); None: plain ``spatial``.
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


def spatial_grid_count(grid_rows: int, grid_cols: int, side: int, image_size, newline: bool) -> int:
    """Length of ``spatial_grid_layout``'s output, from the geometry alone."""
    if not newline:
        return grid_rows * grid_cols * side * side
    top, bottom, left, right = unpad_bounds(grid_rows * side, grid_cols * side, image_size)
    return (bottom - top) * (right - left + 1)


def _kept_grid(crops: CompressedTokens, grid_rows: int, grid_cols: int, side: int, image_size, unpad: bool):
    """The crops' kept patch tokens (N, C) and their grid rows / cols (N,), cut to the unpadded map when
    ``unpad``, in row-major order of the map."""
    tokens, keep = crops.tokens, crops.keep_indices
    first_patch = int(crops.cls_kept)
    rows, cols = grid_positions(keep[:, first_patch:], crops.has_cls, grid_rows, grid_cols, side)
    rows, cols = rows.flatten(), cols.flatten()
    grid_tokens = tokens[:, first_patch : crops.num_kept].reshape(-1, tokens.shape[-1])
    if unpad:
        top, bottom, left, right = unpad_bounds(grid_rows * side, grid_cols * side, image_size)
        inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        rows, cols, grid_tokens = rows[inside], cols[inside], grid_tokens[inside]
    order = (rows * (grid_cols * side) + cols).argsort()
    return grid_tokens[order], rows[order]


def compressed_spatial_layout(
    crops: CompressedTokens, grid_rows: int, grid_cols: int, side: int, image_size, newline: torch.Tensor | None
) -> torch.Tensor:
    """The kept grid tokens of the crops (crops.tokens (K, T, C)) in row-major order of the (unpadded) map,
    ``newline`` after every row that still has tokens (when given; it also turns on unpad to ``image_size``
    (width, height)), then the crops' CLS tokens and merged tokens -> (N, C)."""
    tokens = crops.tokens
    channels = tokens.shape[-1]
    grid_tokens, rows = _kept_grid(crops, grid_rows, grid_cols, side, image_size, newline is not None)
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


def compressed_spatial_count(
    crops: CompressedTokens, grid_rows: int, grid_cols: int, side: int, image_size, newline: bool
) -> int:
    """Length of ``compressed_spatial_layout``'s output; with ``newline`` (unpad) it depends on the kept
    positions (``crops.keep_indices``), not only on the budget. One host read."""
    per_crop = crops.tokens.shape[1]
    if not newline:
        return crops.tokens.shape[0] * per_crop
    _, rows = _kept_grid(crops, grid_rows, grid_cols, side, image_size, True)
    extra = crops.tokens.shape[0] * (per_crop - crops.num_kept + int(crops.cls_kept))
    return int(rows.numel() + rows.unique().numel()) + extra
