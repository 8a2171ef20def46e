"""LLaVA-NeXT (anyres) layouts of compressed crop tokens, as pure tensor functions.

The official VisionZip code (dvlab-research/VisionZip at 3151f6d, its LLaVA-NeXT path) lays out the crops
of a high-resolution image this way (docs/visionzip.md, "LLaVA-NeXT"):
the kept (non-CLS) dominant tokens of all crops are put back on the full (rows * S, cols * S) patch grid
and emitted in row-major order of that grid; then each crop's CLS token (crop order); then all crops'
contextual tokens (crop order). No ``unpad`` and no ``image_newline``. The base image's tokens, which
come first, are the caller's.
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
