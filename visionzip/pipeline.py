"""The visual-token pipeline every model path runs, as typed stages of pure tensor code.

::

    views (V, 3, H, W)
      -> encode_views(adapter, views, layer, method)   ViewTokens (V, T, C): the encoder's tokens of each view,
                                                       with the method's CompressedTokens (kept positions)
      -> project(projector, encoded)                   ViewTokens (V, T, hidden): in the LLM's embedding space
      -> layout_images(projected, views_per_image,     one (N_i, hidden) tensor per image: "flat", or a
                       layout, grids, newline)         LLaVA-NeXT layout ("official" / "spatial") of its crops
    placeholder_count(...)                             N_i from the budget and the geometry, before encoding

Who calls it: our LLaVA (``llava.model.llava_arch.LlavaMetaForCausalLM.get_image_features`` /
``project_views`` and ``VisionTower.encode``) and every Hugging Face family of ``visionzip.hf``; each of them
is an adapter that names its encoder adapter (``visionzip.encoders``), its projector, its feature layer and,
for LLaVA-NeXT, the crop grid of each image (``CropGrid``: the model's own grid geometry, LLaVA's pinpoints
are (width, height), transformers' (height, width)). The layouts' tensor code is ``visionzip.anyres``.

Layouts (``LAYOUTS``):

- ``flat``: each image's views one after the other (LLaVA-1.5, LLaVA's ``mm_patch_merge_type="flat"``,
  video frames, InternVL tiles);
- ``official``: the base view, then the crops in the official VisionZip LLaVA-NeXT order
  (``visionzip.anyres.official_anyres_layout``; no unpad, no newline);
- ``spatial``: the base view, then the crops on LLaVA-NeXT's own (rows * S, cols * S) map (unpad and a
  newline after each row when a ``newline`` is given: ``spatial_unpad``). Uncompressed views always take this
  one for NeXT images (it is LLaVA-NeXT's own layout, and what the official code runs without compression).

An image of one view (no crops) is its tokens, followed by the newline when one is given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .anyres import (
    compressed_spatial_count,
    compressed_spatial_layout,
    official_anyres_layout,
    spatial_grid_count,
    spatial_grid_layout,
)
from .encoders import VisionEncoderAdapter
from .methods.base import CompressedTokens, CompressionMethod

LAYOUTS = ("flat", "official", "spatial")

__all__ = [
    "LAYOUTS",
    "CropGrid",
    "ViewTokens",
    "encode_views",
    "layout_image",
    "layout_images",
    "placeholder_count",
    "project",
    "vision_method",
]


@dataclass
class ViewTokens:
    """Tokens of V views. tokens: (V, T, C) in the encoder's space (``encode_views``) or (V, T, hidden) in
    the LLM's (``project``). compressed: the method's ``CompressedTokens`` of the same views (encoder space,
    with the kept positions the NeXT layouts need), or None when the views were not compressed."""

    tokens: torch.Tensor
    compressed: CompressedTokens | None

    def slice(self, start: int, stop: int) -> ViewTokens:
        """Views ``start:stop`` (the views of one image)."""
        part = slice(start, stop)
        if self.compressed is None:
            return ViewTokens(self.tokens[part], None)
        merged = self.compressed.merged_indices
        compressed = dataclasses.replace(
            self.compressed, tokens=self.compressed.tokens[part], keep_indices=self.compressed.keep_indices[part],
            merged_indices=None if merged is None else merged[part],
        )
        return ViewTokens(self.tokens[part], compressed)


@dataclass(frozen=True)
class CropGrid:
    """The crops of one LLaVA-NeXT image: ``rows`` x ``cols`` crops (row by row) of ``side`` x ``side``
    patches; ``image_size``: the original image's (width, height), for unpad."""

    rows: int
    cols: int
    side: int
    image_size: tuple[int, int]

    @property
    def crops(self) -> int:
        return self.rows * self.cols


def vision_method(method) -> CompressionMethod | None:
    """The vision-side method of ``method`` (a ``CompressionMethod``, a ``CompressionConfig`` or None):
    None when there is none or it acts inside the LLM (stage ``llm``: the tower's output stays whole)."""
    settings = getattr(method, "settings", method) if method is not None else None
    if settings is None or settings.stage == "llm":
        return None
    return settings


# ----- stage 1: the encoder and the method ---------------------------------------------------------
def encode_views(
    adapter: VisionEncoderAdapter,
    pixel_values: torch.Tensor,
    layer: int,
    method: CompressionMethod | None,
    *,
    drop_cls: bool = True,
    early_exit: bool = True,
) -> ViewTokens:
    """pixel_values (V, 3, H, W) -> ViewTokens (V, T, C) of the encoder's layer ``layer``: one tower pass.

    ``method`` None (or an in-LLM method): the layer's tokens, CLS dropped when ``drop_cls`` and the tower
    has one (LLaVA's ``"patch"``, transformers' ``"default"`` strategy). A vision-side method: its
    ``encode`` (the tower up to ``layer``, scoring, selection and merge), ``compressed`` set.
    ``early_exit=False`` runs the tower's complete forward (DeepSpeed ZeRO-3 gathers weights on it)."""
    method = vision_method(method)
    if method is None:
        capture = adapter.run(pixel_values, layer, capture_attn_input=False, early_exit=early_exit)
        return ViewTokens(capture.hidden[:, int(adapter.has_cls and drop_cls) :], None)
    compressed = method.encode(adapter, pixel_values, layer, early_exit=early_exit)
    return ViewTokens(compressed.tokens, compressed)


# ----- stage 2: the projector ---------------------------------------------------------------------
def project(projector: Callable[[torch.Tensor], torch.Tensor], views: ViewTokens) -> ViewTokens:
    """ViewTokens (V, T, C) -> (V, T, hidden) through ``projector`` (an ``nn.Module``; the tokens are cast
    to its floating-point weights' dtype first). ``compressed`` is handed on."""
    tokens = views.tokens
    parameters = getattr(projector, "parameters", None)
    weight = next(parameters(), None) if parameters is not None else None
    if weight is not None and weight.dtype.is_floating_point:
        tokens = tokens.to(weight.dtype)
    return ViewTokens(projector(tokens), views.compressed)


# ----- stage 3: the layout ------------------------------------------------------------------------
def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown visual-token layout {layout!r}; use one of {LAYOUTS}")


def layout_image(
    views: ViewTokens, layout: str, grid: CropGrid | None = None, newline: torch.Tensor | None = None
) -> torch.Tensor:
    """The views of one image (V, T, hidden) -> (N, hidden) as the LLM sees them.

    ``flat``: all views in order. ``official`` / ``spatial``: the base view then the V - 1 crops of ``grid``
    (module docstring); ``newline`` (hidden,): LLaVA-NeXT's ``image_newline`` (``spatial``: unpad and a newline
    per row; after a single view in either NeXT layout), None: none."""
    _check_layout(layout)
    tokens = views.tokens
    if layout == "flat":
        return tokens.flatten(0, 1)
    base = tokens[0]
    if tokens.shape[0] == 1:
        return base if newline is None else torch.cat([base, newline[None].to(base.dtype)], dim=0)
    if grid is None or grid.crops != tokens.shape[0] - 1:
        raise ValueError(
            f"{tokens.shape[0] - 1} crops were given but the image's crop grid is "
            f"{'missing' if grid is None else f'{grid.rows} x {grid.cols}'}"
        )
    if views.compressed is None:
        if base.shape[0] != grid.side * grid.side:
            raise ValueError(
                f"the spatial layout needs {grid.side * grid.side} patch tokens per view, got {base.shape[0]} "
                "(the patch tokens only, no CLS: LLaVA's mm_vision_select_feature 'patch', transformers' "
                "vision_feature_select_strategy 'default')"
            )
        crops = spatial_grid_layout(tokens[1:], grid.rows, grid.cols, grid.side, grid.image_size, newline)
        return torch.cat([base, crops], dim=0)
    crops = views.slice(1, tokens.shape[0])
    # the layouts read the kept positions from ``compressed`` and lay out the projected tokens
    crops = dataclasses.replace(crops.compressed, tokens=crops.tokens)
    if layout == "official":
        grid_tokens = official_anyres_layout(crops, grid.rows, grid.cols, grid.side)
    else:
        grid_tokens = compressed_spatial_layout(crops, grid.rows, grid.cols, grid.side, grid.image_size, newline)
    return torch.cat([base, grid_tokens], dim=0)


def layout_images(
    views: ViewTokens,
    views_per_image: list[int],
    layout: str,
    grids: list[CropGrid | None] | None = None,
    newline: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """All images' views (sum V_i, T, hidden), in image order -> one (N_i, hidden) tensor per image
    (``layout_image``; ``grids``: each image's crop grid, None for one-view images)."""
    _check_layout(layout)
    if sum(views_per_image) != views.tokens.shape[0]:
        raise ValueError(f"{views_per_image} views per image do not add up to the {views.tokens.shape[0]} given")
    if grids is None:
        grids = [None] * len(views_per_image)
    if len(grids) != len(views_per_image):
        raise ValueError(f"{len(views_per_image)} images but {len(grids)} crop grids")
    out, start = [], 0
    for count, grid in zip(views_per_image, grids):
        out.append(layout_image(views.slice(start, start + count), layout, grid, newline))
        start += count
    return out


# ----- the placeholder count ----------------------------------------------------------------------
def placeholder_count(
    layout: str,
    views: int,
    tokens_per_view: int,
    grid: CropGrid | None = None,
    newline: bool = False,
    compressed: bool = True,
    kept: CompressedTokens | None = None,
) -> int:
    """Tokens one image of ``views`` views puts into the LLM under ``layout`` (``layout_image``'s length),
    from the budget (``tokens_per_view``, after the method) and the geometry, before anything is encoded.

    ``newline``: whether the model has LLaVA-NeXT's ``image_newline`` in this layout. ``compressed``: whether
    a vision-side method acted. The one case the geometry cannot tell: the ``spatial`` layout with a
    newline (unpad) of compressed crops, whose kept positions decide how many tokens fall on padding and how
    many rows keep any; there ``kept`` (the crops' ``CompressedTokens``, encoder space) is needed, and a
    ValueError says so without it."""
    _check_layout(layout)
    if views < 1 or tokens_per_view < 0:
        raise ValueError(f"an image needs at least one view and tokens_per_view >= 0; got {views}, {tokens_per_view}")
    if layout == "flat":
        return views * tokens_per_view
    if views == 1:
        return tokens_per_view + int(newline)
    if grid is None or grid.crops != views - 1:
        raise ValueError(f"{views - 1} crops need their crop grid, got {grid}")
    if not compressed:
        return tokens_per_view + spatial_grid_count(grid.rows, grid.cols, grid.side, grid.image_size, newline)
    if layout == "official" or not newline:
        return views * tokens_per_view
    if kept is None:
        raise ValueError(
            "the spatial layout with unpad keeps the kept tokens that fall on the image, not on its padding, so "
            "its token count depends on the positions the method keeps: pass kept= (the crops' CompressedTokens)"
        )
    return tokens_per_view + compressed_spatial_count(kept, grid.rows, grid.cols, grid.side, grid.image_size, True)
