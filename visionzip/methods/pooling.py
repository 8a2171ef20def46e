"""Spatial average pooling of the patch grid: the sanity baseline of token-reduction tables.

No official code (the rule is this docstring). The selected layer's patch tokens (CLS dropped, as
LLaVA's "patch" features) are laid out on their S x S grid (24 x 24 for ViT-L/14-336) and average-pooled
to ``rows x cols`` with ``adaptive_avg_pool2d`` (bin i covers ``floor(i S / rows) .. ceil((i + 1) S /
rows)``), emitted row by row.

Budget rule (``pooling:T``): ``rows`` = the largest divisor of T not above sqrt(T), ``cols = T / rows``
(64 -> 8 x 8, 128 -> 8 x 16, 192 -> 12 x 16, 32 -> 4 x 8). A factor above the grid side is a ValueError
before anything runs (e.g. 61 = 1 x 61 on a 24-wide grid); ``pooling:rows=R,cols=C`` sets the grid
directly. Pooled tokens have no single encoder position: ``keep_indices`` is (B, 0) and every token
counts as merged (on LLaVA-NeXT, crop after crop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..encoders import EncoderCapture, VisionEncoderAdapter
from .base import CompressedTokens, CompressionMethod, check_count, register_method


def pooling_grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) for ``tokens``: rows the largest divisor not above sqrt(tokens)."""
    tokens = check_count("visual tokens", tokens)
    rows = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    return rows, tokens // rows


def pool_patches(patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """patches: (B, S * S, C) in row-major grid order -> (B, rows * cols, C), row-major."""
    bsz, num_patches, channels = patches.shape
    side = math.isqrt(num_patches)
    grid = patches.transpose(1, 2).reshape(bsz, channels, side, side)
    return F.adaptive_avg_pool2d(grid, (rows, cols)).flatten(2).transpose(1, 2)


def check_pooling_grid(adapter: VisionEncoderAdapter, rows, cols, select_layer: int) -> None:
    rows, cols = check_count("rows", rows), check_count("cols", cols)
    adapter.layer_index(select_layer)
    side = adapter.patches_per_side
    if rows > side or cols > side:
        raise ValueError(
            f"pooling: a {rows} x {cols} grid ({rows * cols} tokens) does not fit the {side} x {side} patch grid "
            f"(each side at most {side}); give pooling:rows=R,cols=C with R, C <= {side}"
        )


def reference_pooling(hidden: torch.Tensor, rows: int, cols: int, has_cls: bool = True):
    """The rule above, done plainly on the selected layer's output hidden (B, N, C) (the tower's
    ``hidden_states[select_layer]``): every bin's mean in Python loops. Returns (B, rows * cols, C)."""
    patches = hidden[:, int(has_cls) :]
    side = math.isqrt(patches.shape[1])
    grid = patches.reshape(hidden.shape[0], side, side, hidden.shape[-1])
    out = []
    for i in range(rows):
        top, bottom = (i * side) // rows, -((-(i + 1) * side) // rows)
        for j in range(cols):
            left, right = (j * side) // cols, -((-(j + 1) * side) // cols)
            out.append(grid[:, top:bottom, left:right].mean(dim=(1, 2)))
    return torch.stack(out, dim=1)


@dataclass
class GridMethod(CompressionMethod):
    """A method whose view becomes a ``rows x cols`` grid of tokens (pooling, downsample): the settings, their
    checks, the count and the label they share. Not registered itself."""

    needs_attention_input: ClassVar[bool] = False

    rows: int = 8
    cols: int = 8

    def validate(self):
        self.rows = check_count("rows", self.rows)
        self.cols = check_count("cols", self.cols)
        return self

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.rows * self.cols

    def label(self) -> str:
        return f"{self.name} {self.rows}x{self.cols}"


@register_method
@dataclass
class Pooling(GridMethod):
    """pooling: average pooling of the patch grid to ``rows x cols`` tokens per view."""

    name: ClassVar[str] = "pooling"
    stage: ClassVar[str] = "encoder_output"
    summary: ClassVar[str] = "spatial average pooling of the patch grid"
    reference: ClassVar[str] = "visionzip.methods.pooling.reference_pooling"

    @classmethod
    def from_budget(cls, tokens: int) -> Pooling:
        rows, cols = pooling_grid(tokens)
        return cls(rows=rows, cols=cols)

    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        check_pooling_grid(adapter, self.rows, self.cols, select_layer)

    def compress(self, adapter: VisionEncoderAdapter, capture: EncoderCapture) -> CompressedTokens:
        tokens = pool_patches(capture.hidden[:, int(adapter.has_cls) :], self.rows, self.cols)
        keep = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=tokens.device)
        return CompressedTokens(tokens, keep, adapter.has_cls, cls_kept=False)

    def encode(self, adapter, pixel_values, select_layer: int = -2, early_exit: bool = True) -> CompressedTokens:
        check_pooling_grid(adapter, self.rows, self.cols, select_layer)
        return super().encode(adapter, pixel_values, select_layer, early_exit)
