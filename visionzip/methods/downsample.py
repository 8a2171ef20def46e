"""downsample: the image itself made smaller, so that the vision tower yields fewer tokens -- VTC-Bench's
downsampling baseline, which beats many token-compression methods (the floor every method must beat).

Source of the definition: Chenfei-Liao/VTC-Bench at 983e443, ``external/DART/lmms-eval/lmms_eval/models/
qwen2_vl.py`` (``generate_until``): with ``VTC_IMAGE_RATIO = r`` > 1 each image is resized with
``visual.resize((w // r, h // r), resample=Image.BICUBIC)`` (PIL, antialiased) before the processor, for
r in 1, 2, 3, 4, 5, 10. On Qwen2-VL's native-resolution tower that is 1 / r^2 of the tokens (2D RoPE: any
grid). VTC-Bench's released code implements it for Qwen2-VL only; its LLaVA-OneVision rows come from a
tower with a fixed input size, where a smaller image is scaled back up by the processor (the base view keeps
all its tokens; only the anyres crop count falls).

Our rule, for LLaVA's fixed-size towers (CLIP ViT-L/14-336, SigLIP), per view (an image, or each anyres
crop and the base view of LLaVA-NeXT): the view's normalised pixels (B, 3, S, S) are resized to
``(rows * patch, cols * patch)`` with ``F.interpolate(mode="bicubic", antialias=True)`` (the tensor
counterpart of PIL's BICUBIC resize: the same a = -0.5 kernel, widened by the scale factor), and the tower
runs on that smaller image with its learned position embeddings bicubic-interpolated from the S/p x S/p grid
to rows x cols (transformers' ``interpolate_pos_encoding``, DINO's rule; CLS keeps its own). The image is
not scaled back up: the tower sees ``rows * cols`` patches (+ CLS), so it is cheaper too, and the selected
layer's patch tokens are what the projector gets (CLS dropped, as LLaVA's "patch" features).

Differences from VTC-Bench's resize, and why: it resizes the original image once; here the view the
processor made (336 px, padded or cropped as the checkpoint's ``image_aspect_ratio`` says) is resized a
second time, so that the rule is the same for every view, checkpoint and model family, in the model and not
in a processor. The normalised pixels are resized (normalisation is per-channel affine, so this equals
resizing the raw pixels except that bicubic overshoot is not clipped to 0..255 and not rounded to uint8).

How it differs from ``pooling``: pooling runs the tower at full resolution (577 tokens) and averages the
selected layer's features over grid cells; downsample shrinks the input, so the tower itself sees a coarse
image (every layer's attention is over rows * cols patches) -- what a user gets by sending a smaller image.

Budget rule (``downsample:T``): the largest square grid that fits, ``g = isqrt(T)``, so the image keeps its
aspect as VTC-Bench's ``(w // r, h // r)``: 64 -> 8 x 8 (112 px, VTC-Bench's r = 3 on 336 px), 144 ->
12 x 12 (r = 2), 128 -> 11 x 11 = 121 tokens, 192 -> 13 x 13 = 169: never more than T.
``downsample:rows=R,cols=C`` sets any grid (e.g. 8 x 16 = 128 exactly, anisotropic). A side above the
tower's patch grid (24 on ViT-L/14-336: this rule only shrinks) is a ValueError before anything runs.
No token is an encoder token: ``keep_indices`` is (B, 0), all count as merged (as ``pooling``); each
stands at the full-resolution patch at the centre of its cell (``merged_indices``, ``cell_centres``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..copied import copied_from
from ..encoders import VisionEncoderAdapter, encoder_adapter
from .base import CompressedTokens, check_count, register_method
from .pooling import GridMethod


def downsample_grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) for ``tokens``: the largest square grid with at most ``tokens`` cells."""
    side = math.isqrt(check_count("visual tokens", tokens))
    return side, side


def cell_centres(side: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """(rows * cols,) the full-resolution patch (0-based, row-major on the side x side grid) at the centre of
    each downsampled token's cell: the encoder position that stands for it (``merged_indices``)."""
    r = (torch.arange(rows, device=device) * 2 + 1) * side // (2 * rows)
    c = (torch.arange(cols, device=device) * 2 + 1) * side // (2 * cols)
    return (r.unsqueeze(1) * side + c.unsqueeze(0)).flatten()


def check_downsample_grid(adapter: VisionEncoderAdapter, rows, cols, select_layer: int) -> None:
    rows, cols = check_count("rows", rows), check_count("cols", cols)
    adapter.layer_index(select_layer)
    side = adapter.patches_per_side
    if rows > side or cols > side:
        raise ValueError(
            f"downsample: a {rows} x {cols} grid ({rows * cols} tokens) exceeds the {side} x {side} patch grid of a "
            f"{adapter.image_size} px view (each side at most {side}: the rule only shrinks the image); give "
            f"downsample:rows=R,cols=C with R, C <= {side}"
        )


def downsample_pixels(pixel_values: torch.Tensor, rows: int, cols: int, patch_size: int) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, 3, rows * patch, cols * patch), bicubic with antialiasing
    (computed in float32, returned in the input dtype)."""
    size = (rows * patch_size, cols * patch_size)
    resized = F.interpolate(pixel_values.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.to(pixel_values.dtype)


# Copied from transformers v5.25.0, models/clip/modeling_clip.py, CLIPVisionModel.forward (embeddings with
# interpolated positions, pre-layer norm) and CLIPEncoder.forward (the layer loop), stopped after the selected layer
@copied_from("transformers.models.clip.modeling_clip.CLIPVisionModel.forward", sha="ca1f51ee735860df", version="5.25.0")
@copied_from("transformers.models.clip.modeling_clip.CLIPEncoder.forward", sha="72d9e376fa69940d", version="5.25.0")
def downsample_encode(
    adapter: VisionEncoderAdapter, pixel_values: torch.Tensor, rows: int, cols: int, select_layer: int = -2,
    early_exit: bool = True,
) -> torch.Tensor:
    """The tower on the downsampled views: (B, 3, S, S) -> the selected layer's output (B, rows * cols [+ 1], C)
    (CLS first where the tower has one)."""
    adapter.check_pixels(pixel_values)
    index = adapter.layer_index(select_layer)
    dtype = next(adapter.model.parameters()).dtype
    small = downsample_pixels(pixel_values, rows, cols, adapter.patch_size).to(dtype)
    if not early_exit:  # DeepSpeed ZeRO-3: the model's own complete forward
        out = adapter.model(small, output_hidden_states=True, interpolate_pos_encoding=True)
        return out.hidden_states[index + 1]
    hidden = adapter.core.embeddings(small, interpolate_pos_encoding=True)
    if adapter.pre_norm is not None:
        hidden = getattr(adapter.core, adapter.pre_norm)(hidden)
    for layer in adapter.layers[: index + 1]:
        hidden = layer(hidden, None)
    return hidden


@register_method
@dataclass
class Downsample(GridMethod):
    """downsample: each view resized to ``rows x cols`` patches before the tower (VTC-Bench's baseline)."""

    name: ClassVar[str] = "downsample"
    display_name: ClassVar[str] = "Downsample"
    stage: ClassVar[str] = "tower"
    summary: ClassVar[str] = "the image resized (bicubic, antialiased) so that the tower yields the budget"
    reference: ClassVar[str] = "visionzip.methods.downsample.reference_downsample"

    @classmethod
    def from_budget(cls, tokens: int) -> Downsample:
        rows, cols = downsample_grid(tokens)
        return cls(rows=rows, cols=cols)

    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        check_downsample_grid(adapter, self.rows, self.cols, select_layer)

    def encode(self, adapter, pixel_values, select_layer: int = -2, early_exit: bool = True) -> CompressedTokens:
        check_downsample_grid(adapter, self.rows, self.cols, select_layer)
        hidden = downsample_encode(adapter, pixel_values, self.rows, self.cols, select_layer, early_exit)
        tokens = hidden[:, int(adapter.has_cls) :]
        keep = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=tokens.device)
        centres = cell_centres(adapter.patches_per_side, self.rows, self.cols, tokens.device) + int(adapter.has_cls)
        return CompressedTokens(tokens, keep, adapter.has_cls, cls_kept=False,
                                merged_indices=centres.expand(tokens.shape[0], -1))

    def reference_tokens(self, vision_model, pixel_values, select_layer: int = -2):
        return reference_downsample(vision_model, pixel_values, self.rows, self.cols, select_layer)


@torch.no_grad()
def reference_downsample(vision_model, pixel_values: torch.Tensor, rows: int, cols: int, select_layer: int = -2):
    """The rule above, stated plainly on a HF vision model: resize the pixels, run the model's own forward
    with ``interpolate_pos_encoding=True`` and ``output_hidden_states``, take ``hidden_states[select_layer]``
    without CLS. Returns (B, rows * cols, C)."""
    adapter = encoder_adapter(vision_model)
    size = (rows * adapter.patch_size, cols * adapter.patch_size)
    small = F.interpolate(pixel_values.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    out = vision_model(small.to(pixel_values.dtype), output_hidden_states=True, interpolate_pos_encoding=True)
    return out.hidden_states[select_layer][:, int(adapter.has_cls) :]
