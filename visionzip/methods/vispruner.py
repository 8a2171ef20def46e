"""VisPruner (Zhang et al., 2024): important tokens by CLS attention, diverse tokens by iterative
duplicate removal among the rest. Exactly the official selection (docs/visionzip.md; Theia-4869/VisPruner at
aefa01a, ``llava/model/llava_arch.py`` ``encode_images``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..encoders import EncoderCapture, VisionEncoderAdapter, attention_implementation, encoder_adapter
from .base import (
    CompressedTokens,
    CompressionMethod,
    check_count,
    check_ratio,
    gather_tokens,
    register_method,
)
from .visionzip import layer_queries_keys, resolve_score, scores_from_qk

MAX_DROP_PER_STEP = 8


@dataclass
class VisPrunerOutput:
    """keep_mask: (B, P) bool over patch tokens. tokens: (B, T, hidden) kept patch features in sequence
    order. keep_indices: (B, T) kept patch indices (0-based among patches), ascending."""

    keep_mask: torch.Tensor
    tokens: torch.Tensor
    keep_indices: torch.Tensor


def vispruner_keep_indices(
    scores: torch.Tensor, features: torch.Tensor, num_tokens: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """Indices of the kept patches, important ones first (descending score), then the diverse ones.

    scores: (B, P) importance, features: (B, P, C) patch features -> (B, num_tokens).
    """
    num_important = int(num_tokens * important_ratio)
    num_diverse = num_tokens - num_important
    order = scores.argsort(dim=1, descending=True)
    important, residual = order[:, :num_important], order[:, num_important:]
    if num_diverse == 0:
        return important
    normed = features / features.norm(dim=-1, keepdim=True)
    while True:
        remaining = residual.shape[1]
        drop = min(MAX_DROP_PER_STEP, remaining - num_diverse)
        if drop <= 0:
            break
        tokens = gather_tokens(normed, residual)
        even, odd = tokens[:, ::2], tokens[:, 1::2]
        duplication = torch.matmul(even, odd.transpose(1, 2)).max(dim=-1).values  # (B, ceil(R/2))
        survivors = duplication.argsort(dim=1, descending=True)[:, drop:]
        residual = torch.cat([residual[:, ::2].gather(1, survivors), residual[:, 1::2]], dim=1)
    return torch.cat([important, residual], dim=1)


def check_vispruner_budget(adapter: VisionEncoderAdapter, num_tokens, important_ratio, select_layer: int):
    num_tokens = check_count("num_tokens", num_tokens)
    important_ratio = check_ratio("important_ratio", important_ratio)
    adapter.layer_index(select_layer)
    if num_tokens > adapter.num_patches:
        raise ValueError(
            f"num_tokens = {num_tokens} exceeds the {adapter.num_patches} patch tokens of layer {select_layer}"
        )
    return num_tokens, important_ratio


def vispruner_compress(
    adapter: VisionEncoderAdapter, capture: EncoderCapture, num_tokens: int, important_ratio: float = 0.5
) -> VisPrunerOutput:
    score = resolve_score("auto", adapter.has_cls, type(adapter.model).__name__)
    q, k, scale = layer_queries_keys(adapter, capture, score)
    scores = scores_from_qk(q, k, scale, score, adapter.has_cls, "mean", adapter.received_attention)
    patches = capture.hidden[:, int(adapter.has_cls) :]
    keep = vispruner_keep_indices(scores, patches, num_tokens, important_ratio).sort(dim=1).values
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
    return VisPrunerOutput(mask, gather_tokens(patches, keep), keep)


def vispruner_select(
    vision_model,
    pixel_values: torch.Tensor,
    num_tokens: int,
    important_ratio: float = 0.5,
    select_layer: int = -2,
    attn_implementation: str | None = "eager",
) -> VisPrunerOutput:
    """VisPruner on a HF vision model: ``.keep_mask`` (B, num_patches) and ``.tokens`` (B, T, hidden).

    ``attn_implementation``: the attention kernels the tower runs with during this call. The default,
    "eager", reproduces the official selection bit for bit: its duplicate-removal loop is a chain of
    argsorts over near-tied cosine similarities (on random-weight models, the last bit of a feature
    decides), and the official code runs the tower with eager attention (it asks for
    ``output_attentions``). No attention map is kept here either way. ``None`` keeps the model's own
    kernels (e.g. SDPA): faster, the same method, but near-ties may resolve differently.
    """
    adapter = encoder_adapter(vision_model)
    num_tokens, important_ratio = check_vispruner_budget(adapter, num_tokens, important_ratio, select_layer)
    adapter.check_pixel_values(pixel_values)
    with torch.no_grad(), attention_implementation(adapter.model, attn_implementation):
        capture = adapter.run(pixel_values, select_layer)
        return vispruner_compress(adapter, capture, num_tokens, important_ratio)


@register_method
@dataclass
class VisPruner(CompressionMethod):
    """VisPruner: ``tokens`` patches per image (per crop on LLaVA-NeXT), ``important_ratio`` of them by CLS
    attention, the rest by iterative duplicate removal. Acts on the tower's selected layer."""

    name: ClassVar[str] = "vispruner"
    display_name: ClassVar[str] = "VisPruner"
    stage: ClassVar[str] = "encoder_output"
    summary: ClassVar[str] = "important tokens by CLS attention + diverse tokens by duplicate removal"
    positional: ClassVar[tuple[str, ...]] = ("tokens", "important_ratio")
    reference: ClassVar[str] = "visionzip.reference.official_vispruner"

    tokens: int = 64
    important_ratio: float = 0.5

    def validate(self):
        self.tokens = check_count("tokens", self.tokens)
        self.important_ratio = check_ratio("important_ratio", self.important_ratio)
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> VisPruner:
        return cls(tokens=check_count("visual tokens", tokens))

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.tokens

    def label(self) -> str:
        return f"vispruner {self.tokens}"

    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        check_vispruner_budget(adapter, self.tokens, self.important_ratio, select_layer)

    def compress(self, adapter: VisionEncoderAdapter, capture: EncoderCapture) -> CompressedTokens:
        out = vispruner_compress(adapter, capture, self.tokens, self.important_ratio)
        offset = int(adapter.has_cls)
        return CompressedTokens(out.tokens, out.keep_indices + offset, adapter.has_cls, cls_kept=False)

    def reference_tokens(self, vision_model, pixel_values, select_layer: int = -2):
        from ..reference import official_vispruner

        return official_vispruner(
            vision_model, pixel_values, self.tokens, self.important_ratio, select_layer, return_tokens=True
        )
