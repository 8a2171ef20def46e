"""VisionZip (Yang et al., CVPR 2025): dominant tokens by attention, contextual tokens by key merging.

Exactly the official computation (docs/visionzip.md; dvlab-research/VisionZip at 3151f6d,
``visionzip/clip_encoder.py`` and ``visionzip/utils.py``), organised as pure tensor functions:

1. ``patch_scores``: the scoring layer's CLS attention summed over heads (or, without CLS, the mean
   attention each token receives).
2. ``select_dominant``: CLS + the top ``dominant - 1`` patches, emitted in sequence order.
3. ``merge_contextual``: the remaining tokens are split into ``contextual`` uniformly spaced targets and
   the rest; each rest token joins the target whose (head-averaged, L2-normalised) key is most similar;
   a contextual token is ``target + mean(joined tokens)``.

Differences from the official code that do not change results: attention is recomputed for the CLS row
only (the official code asks all 24 layers for eager attention maps), and merging uses a scatter-add
instead of a dense (N, C) one-hot matrix multiplication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budgets import ANYRES_VIEWS
from ..encoders import EncoderCapture, VisionEncoderAdapter, attention_implementation, encoder_adapter
from ..scoring import cls_attention, key_metric, received_attention
from .base import (
    CompressedTokens,
    CompressionMethod,
    check_count,
    complement_indices,
    gather_tokens,
    register_method,
)

SCORES = ("auto", "cls", "received")

# Paper budgets (VisionZip Table 1 / 2): visual tokens per image (LLaVA-1.5) -> (dominant, contextual);
# LLaVA-NeXT's totals over its ANYRES_VIEWS views are the same split per crop (640 / 320 / 160 = 5 x 128 / 64 /
# 32; visionzip.budgets).
VISIONZIP_BUDGETS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
VISIONZIP_NEXT_BUDGETS = {640: (108, 20), 320: (54, 10), 160: (27, 5)}


@dataclass
class VisionZipOutput:
    """tokens: (B, D + C, hidden) = [dominant (sequence order) ; contextual].
    keep_indices: (B, D) encoder positions of the dominant tokens, ascending (CLS = 0 first).
    contextual_indices: (B, C) encoder positions of the contextual targets.
    remaining_indices: (B, N - D) encoder positions not kept as dominant, ascending.
    assignment: (B, N - D) for each remaining token, which contextual token (0..C-1) it went into.
    """

    tokens: torch.Tensor
    keep_indices: torch.Tensor
    contextual_indices: torch.Tensor
    remaining_indices: torch.Tensor
    assignment: torch.Tensor
    has_cls: bool = True


def resolve_score(score: str, has_cls: bool, encoder_name: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "auto":
        return "cls" if has_cls else "received"
    if score == "cls" and not has_cls:
        raise ValueError(
            f"score='cls' needs an encoder with a CLS token, and {encoder_name} has none; "
            "use score='received' (mean received attention, VisionZip appendix A.2)"
        )
    return score


def layer_queries_keys(adapter: VisionEncoderAdapter, capture: EncoderCapture, score: str):
    """q, k, scale of the scoring layer: only the CLS query row for CLS scoring, all queries otherwise."""
    rows = slice(0, 1) if score == "cls" else None
    return adapter.queries_keys(capture.layer_index, capture.attn_input, query_rows=rows)


def scores_from_qk(
    q: torch.Tensor, k: torch.Tensor, scale: float, score: str, has_cls: bool, head_reduce: str = "sum",
    received=received_attention,
) -> torch.Tensor:
    """Importance of every non-CLS token: (B, P) float32.

    score "cls": q is the CLS row (B, H, 1, d); its attention over patch keys, reduced over heads with
    ``head_reduce`` ("sum" for VisionZip, "mean" for VisPruner). "received": q (B, H, N, d); mean
    attention each token receives (mean over heads and queries), by ``received`` (the adapter's
    ``received_attention``: adapters whose tokens group several patches score them their tower's way).
    """
    offset = int(has_cls)
    if score == "cls":
        attn = cls_attention(q, k, scale)[:, :, offset:]
        return attn.sum(dim=1) if head_reduce == "sum" else attn.mean(dim=1)
    return received(q, k, scale)[:, offset:]


def patch_scores(
    adapter: VisionEncoderAdapter, capture: EncoderCapture, score: str = "auto", head_reduce: str = "sum"
) -> torch.Tensor:
    """(B, P) importance of the non-CLS tokens of a captured layer (see ``scores_from_qk``)."""
    score = resolve_score(score, adapter.has_cls, type(adapter.model).__name__)
    q, k, scale = layer_queries_keys(adapter, capture, score)
    return scores_from_qk(q, k, scale, score, adapter.has_cls, head_reduce, adapter.received_attention)


def select_dominant(scores: torch.Tensor, dominant: int, has_cls: bool) -> torch.Tensor:
    """scores: (B, P) over patches -> (B, dominant) encoder positions, ascending. With a CLS token it is
    always kept (position 0) and counts towards ``dominant``."""
    offset = int(has_cls)
    top = scores.topk(dominant - offset, dim=1).indices + offset
    if has_cls:
        # (B, 1) zeros built from the batch size: ``top[:, :1]`` is empty when dominant == 1 (CLS alone)
        cls = torch.zeros(top.shape[0], 1, dtype=top.dtype, device=top.device)
        top = torch.cat([cls, top], dim=1)
    return top.sort(dim=1).values


def contextual_targets(
    num_remaining: int, contextual: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly spaced targets within the remaining list and the positions that merge into them.
    Returns (targets (C,), others (R - C,)) as index tensors built on ``device`` from the static sizes:
    no ``nonzero`` and no host-to-device copy, either of which makes the host wait for the tower's
    kernels on CUDA (a blocking ``.to(device)`` synchronises the stream)."""
    step = max(1, num_remaining // contextual)
    num_targets = min(contextual, -(-num_remaining // step))  # len(range(0, num_remaining, step)[:contextual])
    targets = torch.arange(0, step * num_targets, step, device=device)
    position = torch.arange(num_remaining, device=device)
    is_target = (position % step == 0) & (position < step * num_targets)
    # a stable sort puts the non-targets (0) first, in ascending order
    others = torch.sort(is_target.to(torch.uint8), stable=True).indices[: num_remaining - num_targets]
    return targets, others


def merge_contextual(
    hidden: torch.Tensor, metric: torch.Tensor, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the non-dominant tokens into ``contextual`` tokens.

    hidden: (B, R, C) remaining tokens, metric: (B, R, d) their keys, both in sequence order.
    Returns contextual tokens (B, contextual, C), target positions (contextual,) within the remaining
    list, and the assignment (B, R) of every remaining token to a contextual token.
    """
    bsz, num_remaining, channels = hidden.shape
    targets, others = contextual_targets(num_remaining, contextual, hidden.device)
    normed = metric / metric.norm(dim=-1, keepdim=True)
    similarity = torch.matmul(normed[:, others], normed[:, targets].transpose(1, 2))  # (B, R-C, C)
    assign = similarity.argmax(dim=-1)  # first index wins ties, as the official argmax
    # sum of the joined tokens per target by scatter-add (fp32 accumulation), then the mean
    sums = torch.zeros(bsz, contextual, channels, dtype=torch.float32, device=hidden.device)
    sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, channels), hidden[:, others].float())
    counts = torch.zeros(bsz, contextual, dtype=torch.float32, device=hidden.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
    mean = (sums / counts.clamp(min=1).unsqueeze(-1)).to(hidden.dtype)
    tokens = hidden[:, targets] + mean
    assignment = torch.empty(bsz, num_remaining, dtype=torch.long, device=hidden.device)
    assignment[:, targets] = torch.arange(contextual, device=hidden.device)
    assignment[:, others] = assign
    return tokens, targets, assignment


def check_visionzip_budget(adapter: VisionEncoderAdapter, dominant, contextual, select_layer: int) -> tuple[int, int]:
    dominant = check_count("dominant", dominant)
    contextual = check_count("contextual", contextual)
    adapter.layer_index(select_layer)
    total = adapter.num_tokens
    if dominant + contextual > total:
        raise ValueError(
            f"dominant + contextual = {dominant + contextual} exceeds the {total} tokens of layer {select_layer}"
        )
    return dominant, contextual


def visionzip_compress(
    adapter: VisionEncoderAdapter,
    capture: EncoderCapture,
    dominant: int,
    contextual: int,
    score: str = "auto",
) -> VisionZipOutput:
    """VisionZip on an encoder pass already captured by ``adapter.run``."""
    hidden = capture.hidden
    num_tokens = hidden.shape[1]
    score = resolve_score(score, adapter.has_cls, type(adapter.model).__name__)
    q, k, scale = layer_queries_keys(adapter, capture, score)
    scores = scores_from_qk(q, k, scale, score, adapter.has_cls, "sum", adapter.received_attention)
    keep = select_dominant(scores, dominant, adapter.has_cls)
    remaining = complement_indices(keep, num_tokens)
    metric = key_metric(k)
    contextual_tokens, targets, assignment = merge_contextual(
        gather_tokens(hidden, remaining), gather_tokens(metric, remaining), contextual
    )
    tokens = torch.cat([gather_tokens(hidden, keep), contextual_tokens], dim=1)
    return VisionZipOutput(tokens, keep, remaining[:, targets], remaining, assignment, adapter.has_cls)


def zip_vision_tokens(
    vision_model,
    pixel_values: torch.Tensor,
    dominant: int,
    contextual: int,
    select_layer: int = -2,
    score: str = "auto",
    attn_implementation: str | None = None,
) -> VisionZipOutput:
    """VisionZip on a HF vision model (CLIP or SigLIP).

    pixel_values: (B, 3, H, W) normalised. Returns ``.tokens`` (B, dominant + contextual, hidden) in the
    official order and ``.keep_indices`` (B, dominant), each image selected on its own.
    ``score``: "auto" (CLS attention if the encoder has a CLS token, else received attention), "cls" or
    "received". ``attn_implementation``: kernels for the tower during this call (None: the model's own,
    e.g. SDPA; VisionZip's top-k and argmax are robust to the last-bit differences between kernels).
    """
    adapter = encoder_adapter(vision_model)
    dominant, contextual = check_visionzip_budget(adapter, dominant, contextual, select_layer)
    resolve_score(score, adapter.has_cls, type(adapter.model).__name__)
    adapter.check_pixel_values(pixel_values)
    with torch.no_grad(), attention_implementation(adapter.model, attn_implementation):
        capture = adapter.run(pixel_values, select_layer)
        return visionzip_compress(adapter, capture, dominant, contextual, score)


def visionzip_split(tokens: int) -> tuple[int, int]:
    """The paper's (dominant, contextual) for ``tokens`` per view: 64 -> 54 + 10, 128 -> 108 + 20,
    192 -> 162 + 30, 32 -> 27 + 5 (NeXT's 160 over 5 views); other budgets keep the same 27 : 5 ratio,
    with at least one contextual token (and one dominant: the CLS)."""
    tokens = check_count("visual tokens", tokens, minimum=2)
    paper = {**VISIONZIP_BUDGETS, **{total // ANYRES_VIEWS: split for total, split in VISIONZIP_NEXT_BUDGETS.items()}}
    if tokens in paper:
        return paper[tokens]
    dominant = min(max(1, tokens * 27 // 32), tokens - 1)
    return dominant, tokens - dominant


@register_method
@dataclass
class VisionZip(CompressionMethod):
    """VisionZip: ``dominant`` tokens (CLS + top patches by CLS attention) + ``contextual`` merged tokens,
    per image (per crop on LLaVA-NeXT). Acts on the tower's selected layer, before the projector."""

    name: ClassVar[str] = "visionzip"
    display_name: ClassVar[str] = "VisionZip"
    stage: ClassVar[str] = "encoder_output"
    summary: ClassVar[str] = "dominant tokens by attention + contextual tokens merged by key similarity"
    positional: ClassVar[tuple[str, ...]] = ("dominant", "contextual")
    reference: ClassVar[str] = "visionzip.reference.official_visionzip"

    dominant: int = 54
    contextual: int = 10

    def validate(self):
        self.dominant = check_count("dominant", self.dominant)
        self.contextual = check_count("contextual", self.contextual)
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> VisionZip:
        dominant, contextual = visionzip_split(tokens)
        return cls(dominant=dominant, contextual=contextual)

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.dominant + self.contextual

    def label(self) -> str:
        return f"visionzip {self.dominant}+{self.contextual}"

    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        check_visionzip_budget(adapter, self.dominant, self.contextual, select_layer)

    def compress(self, adapter: VisionEncoderAdapter, capture: EncoderCapture) -> CompressedTokens:
        out = visionzip_compress(adapter, capture, self.dominant, self.contextual)
        return CompressedTokens(
            out.tokens, out.keep_indices, adapter.has_cls, cls_kept=adapter.has_cls, merged_indices=out.contextual_indices
        )

    def reference_tokens(self, vision_model, pixel_values, select_layer: int = -2):
        from ..reference import official_visionzip

        return official_visionzip(vision_model, pixel_values, self.dominant, self.contextual, select_layer)[0]

    def reference_merge_shape(self, num_tokens: int) -> tuple[int, int]:
        # the official merge multiplies a (contextual, remaining - contextual) one-hot matrix
        remaining = num_tokens - self.dominant
        return self.contextual, remaining - self.contextual
