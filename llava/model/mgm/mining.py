"""Mini-Gemini's patch-info mining: each low-resolution (LR) visual token, as a query, attends over the
high-resolution (HR) features of its own image region; the result is added to the token.

MGM (dvlab-research/MGM at 769820c, ``mgm/model/mgm_arch.py``, ``MGMMetaForCausalLM.unified_resampler``):
the HR map (B, C_aux, H, W) of a square image is cut into the LR grid's n x n cells (n = sqrt(576) = 24 for
ViT-L/14-336; a cell is (H / n) x (W / n) HR features: 8 x 8 at 768 px); query = ``vlm_uni_query_projector``
(LayerNorm + Linear) of the LR token, keys / values = ``vlm_uni_aux_projector`` / ``vlm_uni_val_projector``
(LayerNorm + Linear) of the cell's HR features; ``softmax(q k^T / sqrt(C)) v`` (``nan_to_num`` on the
logits, as the official). ``encode_images`` adds it to the LR token before ``mm_projector``.

[VisionZip-LLaVA] ``mine_patches`` mines any subset of the LR tokens: token t queries the cell of LR patch
``patches[b, t]`` (-1: no cell, nothing is added). With every patch in order it is the official computation;
with a compression method's kept tokens only their cells' HR features are projected (``docs/mgm.md`` says
which position each kind of compressed token mines).
"""
from __future__ import annotations

import torch
from torch import nn


def build_mining_projectors(mm_hidden_size: int, mm_hidden_size_aux: int) -> dict[str, nn.Sequential]:
    """MGM's three projectors (``initialize_uni_modules``): query from the LR width, key and value from the HR
    width, each LayerNorm + Linear to the LR width."""
    return {
        "vlm_uni_query_projector": nn.Sequential(nn.LayerNorm(mm_hidden_size), nn.Linear(mm_hidden_size, mm_hidden_size)),
        "vlm_uni_aux_projector": nn.Sequential(nn.LayerNorm(mm_hidden_size_aux), nn.Linear(mm_hidden_size_aux, mm_hidden_size)),
        "vlm_uni_val_projector": nn.Sequential(nn.LayerNorm(mm_hidden_size_aux), nn.Linear(mm_hidden_size_aux, mm_hidden_size)),
    }


def hr_cells(hr: torch.Tensor, grid: int) -> torch.Tensor:
    """HR map (B, C, H, W) -> (B, grid * grid, cell, C): each LR patch's HR features, LR patches row-major,
    features row-major inside a cell (MGM's reshape). H and W must be multiples of ``grid``."""
    batch, channels, height, width = hr.shape
    if height != width or height % grid:
        raise ValueError(f"the HR feature map must be square and a multiple of the {grid} x {grid} LR grid; got {height} x {width}")
    side = height // grid
    cells = hr.permute(0, 2, 3, 1).reshape(batch, grid, side, grid, side, channels)
    return cells.permute(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, side * side, channels)


def hr_cells_at(hr: torch.Tensor, grid: int, patches: torch.Tensor) -> torch.Tensor:
    """``hr_cells(hr, grid)[b, patches[b]]`` without laying out every cell: hr (B, C, H, W), patches (B, T) ->
    (B, T, cell, C)."""
    batch, channels, height, width = hr.shape
    if height != width or height % grid:
        raise ValueError(f"the HR feature map must be square and a multiple of the {grid} x {grid} LR grid; got {height} x {width}")
    side = height // grid
    cells = hr.reshape(batch, channels, grid, side, grid, side).permute(0, 2, 4, 3, 5, 1)  # a view (B, n, n, s, s, C)
    rows = torch.arange(batch, device=hr.device)[:, None]
    picked = cells[rows, torch.div(patches, grid, rounding_mode="floor"), patches % grid]  # (B, T, s, s, C)
    return picked.reshape(batch, patches.shape[1], side * side, channels)


def mine_patches(
    tokens: torch.Tensor,
    hr: torch.Tensor,
    patches: torch.Tensor | None,
    query_projector: nn.Module,
    aux_projector: nn.Module,
    val_projector: nn.Module,
    grid: int,
) -> torch.Tensor:
    """tokens (B, T, C) LR tokens; hr (B, C_aux, H, W); patches (B, T) the LR patch (0..grid^2 - 1) each token
    mines, -1 for none, or None for "token t is patch t" (T = grid^2, MGM's own case) -> (B, T, C): the
    mined HR features (zeros where ``patches`` is -1), to be added to ``tokens``."""
    if patches is None:
        if tokens.shape[1] != grid * grid:
            raise ValueError(f"{tokens.shape[1]} tokens but a {grid} x {grid} grid: give the patch of each token")
        chosen, valid = hr_cells(hr, grid), None  # (B, grid^2, cell, C_aux)
    else:
        valid = patches >= 0
        chosen = hr_cells_at(hr, grid, patches.clamp(min=0))  # only the mined cells are copied
    query = query_projector(tokens)  # (B, T, C)
    keys = aux_projector(chosen)  # (B, T, cell, C)
    values = val_projector(chosen)
    logits = query[:, :, None] @ (keys.transpose(-1, -2) / (keys.shape[-1] ** 0.5))  # (B, T, 1, cell)
    mined = (logits.nan_to_num().softmax(-1) @ values).squeeze(2)  # (B, T, C)
    if valid is not None:
        mined = mined * valid[..., None].to(mined.dtype)
    return mined


def mining_patches(compressed, num_patches: int) -> torch.Tensor:
    """The LR patch each compressed token mines, (B, T) with -1 for none, from a method's ``CompressedTokens``:
    a kept token mines its own patch (the CLS token, which has none, mines nothing); a merged token mines the
    patch of the encoder position that stands for it (``merged_indices``: VisionZip's contextual target,
    downsample's cell centre) or nothing where the method gives none (pooling, ToMe, PruMerge's extra token)."""
    offset = int(compressed.has_cls)
    kept = compressed.keep_indices - offset  # CLS (position 0) -> -1
    batch = compressed.tokens.shape[0]
    if compressed.num_merged == 0:
        merged = kept.new_empty(batch, 0)
    elif compressed.merged_indices is not None:
        merged = compressed.merged_indices.to(kept.device) - offset
    else:
        merged = kept.new_full((batch, compressed.num_merged), -1)
    patches = torch.cat([kept, merged], dim=1)
    if patches.shape[1] != compressed.tokens.shape[1]:
        raise ValueError(f"{patches.shape[1]} token positions for {compressed.tokens.shape[1]} compressed tokens")
    return patches.masked_fill(patches >= num_patches, -1)
