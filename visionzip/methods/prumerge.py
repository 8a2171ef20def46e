"""LLaVA-PruMerge and PruMerge+ (Shang et al., 2024): CLS-attention outliers kept, merged with their
key-nearest tokens; PruMerge+ adds spatially uniform samples.

Official code: 42Shawn/LLaVA-PruMerge at 097c041, ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionTower.token_prune_merge_advanced`` = PruMerge, ``token_prune_merge_advanced_plus`` =
PruMerge+, ``outlier_dectection``, ``complement_idx``). For a batch of views it does:

1. run the tower (``output_hidden_states``) with hooks on the **last** layer's ``q_proj`` / ``k_proj``
   (``encoder.layers[23]``); features = ``hidden_states[-2]`` without the CLS token, (B, N = 576, C);
2. attention over the **full width** (no split into heads): ``softmax(q k^T * C**-0.5)``; the CLS row
   over the patches is ``cls_attn`` (B, N);
3. the keep count: adaptive (the default) ``ratio = #(cls_attn > Q3 + 1.5 IQR) / N`` (numpy percentiles
   of the whole batch flattened: batch 1 as written), or fixed ``int(N * ratio)`` (``if_adaptive=False``,
   ratio 1/8); ``idx`` = top-k of ``cls_attn`` (descending);
4. PruMerge+ only, adaptive: append ``arange(0, 575, int(int(1/ratio) / 3))`` positions not already in
   ``idx`` (batch 1 only as written); fixed: append ``arange(int(step/2), 575, step)``, step = int(1/ratio),
   without removing duplicates;
5. ``compl`` = the complement of ``idx`` by ``complement_idx`` (sort of ``arange(N)`` with ``idx``
   zeroed, first ``len(idx)`` dropped: with duplicates in ``idx`` it loses the smallest pruned positions);
6. each kept token ``i`` (in ``idx`` order) += the sum of its 32 most key-similar tokens (cosine of the
   full-width keys, L2-normalised) among all the others (the other kept ones, then ``compl``), each
   weighted by its ``cls_attn`` (no normalisation of the weights);
7. one extra token = ``sum(cls_attn * feature)`` over ``compl``, appended: output (B, K + 1, C), kept
   tokens in ``idx`` order.

What we do, and why:

- Only the CLS query row is computed (``(B, 1, N + 1)`` instead of the full ``(B, N + 1, N + 1)`` map),
  from the last layer's q and k; for LLaVA's select_layer -2 the last layer's attention input is its
  ``layer_norm1`` of the captured features, so the last layer does not run at all.
- Steps 6 and 7 are vectorised over the batch and the kept tokens (one similarity matrix, ``topk``, one
  weighted matrix product) instead of a Python double loop; the candidate list is the official one
  (kept entries except ``i``, then ``compl``), so even the duplicate quirk of step 5 is reproduced.
- Each sample selects on its own (quartiles per image, PruMerge+ additions per image). The adaptive modes
  keep a data-dependent count: a batch whose views keep different counts is a ValueError (the tokens of
  one call must have one length: there is no padding the LLM could ignore); run such views one at a time,
  or use the fixed budget below. PruMerge+ adaptive with no outlier, or with a ratio above 1/3, is a
  ValueError (the official code divides by zero / calls ``arange`` with step 0).
- Output in **sequence order** (``keep_indices`` ascending, the contract of ``CompressedTokens`` and the
  order VisionZip emits), not the official descending-attention order; then the extra token. The token
  at a kept position is that encoder token plus its weighted neighbours.
- ``from_budget(T)`` (``METHOD:T``, mode "budget"), our addition for the papers' fixed budgets: exactly T
  tokens = T - 1 kept + the extra token. PruMerge keeps the top T - 1 by CLS attention; PruMerge+ keeps
  the top ``ceil((T - 1) / 2)`` and adds ``floor((T - 1) / 2)`` positions spread uniformly over the
  remaining (not yet kept) patches in sequence order (position ``floor((j + 1/2) * R / U)`` of that list
  for j < U), so that the count is exact and has no duplicates. The paper modes stay available as
  ``prumerge:mode=adaptive`` and ``prumerge+:mode=fixed,ratio=0.125``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders import EncoderCapture, VisionEncoderAdapter, attention_implementation, encoder_adapter
from .base import (
    CompressedTokens,
    CompressionMethod,
    check_count,
    check_ratio,
    gather_tokens,
    register_method,
)

MODES = ("budget", "adaptive", "fixed")
NEIGHBOURS = 32  # the official cluster size (``topk(..., k=int(32))``)
OFFICIAL_SEQUENCE_END = 575  # the official ``arange(..., 575, ...)`` stops before the last patch


# ----- selection ----------------------------------------------------------------------------------
def uniform_additions_fixed(ratio: float) -> list[int]:
    """Official fixed-mode PruMerge+ additions: ``arange(int(step/2), 575, step)``, step = int(1/ratio)."""
    step = int(1 / ratio)
    return list(range(int(step / 2), OFFICIAL_SEQUENCE_END, step))


def uniform_additions_adaptive(ratio: float) -> list[int]:
    """Official adaptive-mode PruMerge+ candidates: ``arange(0, 575, int(int(1/ratio) / 3))``."""
    if ratio <= 0:
        raise ValueError("prumerge+ (adaptive): no CLS-attention outlier in a view (ratio 0); the official code "
                         "divides by zero here. Use a fixed budget, e.g. prumerge+:64")
    stride = int(int(1 / ratio) / 3)
    if stride < 1:
        raise ValueError(f"prumerge+ (adaptive): outlier ratio {ratio:.3f} is above 1/3, which gives a sampling "
                         "step of 0 (the official arange fails). Use a fixed budget, e.g. prumerge+:64")
    return list(range(0, OFFICIAL_SEQUENCE_END, stride))


def outlier_counts(cls_attn: torch.Tensor) -> list[int]:
    """Per view, how many CLS-attention values lie above Q3 + 1.5 IQR (linear-interpolated quartiles,
    numpy's default). cls_attn: (B, N)."""
    quartiles = torch.quantile(cls_attn.double(), torch.tensor([0.25, 0.75], dtype=torch.float64,
                                                               device=cls_attn.device), dim=1)
    upper = quartiles[1] + 1.5 * (quartiles[1] - quartiles[0])
    return (cls_attn.double() > upper.unsqueeze(1)).sum(dim=1).tolist()


def uniform_among_rest(selected: torch.Tensor, num_patches: int, count: int) -> torch.Tensor:
    """``count`` positions spread uniformly over the patches not in ``selected`` (B, K), in sequence order:
    entry ``floor((j + 1/2) * R / count)`` of the remaining list, R = num_patches - K. -> (B, count)."""
    mask = torch.zeros(selected.shape[0], num_patches, dtype=torch.uint8, device=selected.device)
    mask.scatter_(1, selected, 1)
    rest = torch.sort(mask, dim=1, stable=True).indices[:, : num_patches - selected.shape[1]]
    remaining = rest.shape[1]
    picks = ((2 * torch.arange(count, device=selected.device) + 1) * remaining) // (2 * count)
    return rest[:, picks]


def prumerge_select(cls_attn: torch.Tensor, plus: bool, mode: str, tokens: int, ratio: float) -> torch.Tensor:
    """The kept patch indices (B, K) in the official order (top by attention, then PruMerge+ additions).
    cls_attn: (B, N) CLS attention over the patches."""
    bsz, num_patches = cls_attn.shape
    if mode == "budget":
        top = (tokens - 1 + 1) // 2 if plus else tokens - 1
        idx = cls_attn.topk(top, dim=1).indices
        if plus:
            idx = torch.cat([idx, uniform_among_rest(idx, num_patches, tokens - 1 - top)], dim=1)
        return idx
    if mode == "fixed":
        top = int(num_patches * ratio)
        idx = cls_attn.topk(top, dim=1).indices
        if plus:
            extra = torch.tensor(uniform_additions_fixed(ratio), device=idx.device)
            idx = torch.cat([idx, extra.unsqueeze(0).expand(bsz, -1)], dim=1)
        return idx
    # adaptive: a data-dependent count per view
    rows = []
    for view, count in enumerate(outlier_counts(cls_attn)):
        view_ratio = count / num_patches
        row = cls_attn[view].topk(int(num_patches * view_ratio)).indices
        if plus:
            taken = set(row.tolist())
            extra = [p for p in uniform_additions_adaptive(view_ratio) if p not in taken]
            row = torch.cat([row, torch.tensor(extra, dtype=row.dtype, device=row.device)])
        rows.append(row)
    counts = [row.numel() for row in rows]
    if len(set(counts)) > 1:
        raise ValueError(
            f"{'prumerge+' if plus else 'prumerge'} (adaptive) keeps a different number of tokens per view in "
            f"this batch ({counts}); one call returns one length. Run these views one at a time, or use a fixed "
            f"budget (e.g. {'prumerge+' if plus else 'prumerge'}:64)"
        )
    return torch.stack(rows)


def complement_of(idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The official ``complement_idx``: ``arange(N)`` with ``idx`` zeroed, sorted, first K dropped.
    idx: (B, K) -> (B, N - K); the plain complement when ``idx`` has no duplicates."""
    positions = torch.arange(num_patches, device=idx.device).expand(idx.shape[0], -1)
    return positions.scatter(1, idx, 0).sort(dim=1).values[:, idx.shape[1] :]


def prumerge_merge(
    features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, idx: torch.Tensor, neighbours: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 5-7 of the official code, vectorised.

    features: (B, N, C) patch features, keys: (B, N, C) the last layer's patch keys, cls_attn: (B, N),
    idx: (B, K) kept patch indices. Returns the updated kept tokens (B, K, C) in ``idx`` order and the
    extra token (B, 1, C).
    """
    bsz, num_patches, _ = features.shape
    kept = idx.shape[1]
    compl = complement_of(idx, num_patches)
    candidates = torch.cat([idx, compl], dim=1)  # the official "rest" list, with entry i for token i
    normed = F.normalize(keys, p=2, dim=-1)
    similarity = torch.matmul(gather_tokens(normed, idx), gather_tokens(normed, candidates).transpose(1, 2))
    own = torch.arange(kept, device=idx.device)
    similarity[:, own, own] = -math.inf  # a token is not its own neighbour
    nearest = similarity.topk(neighbours, dim=-1).indices  # (B, K, neighbours) into candidates
    positions = candidates.unsqueeze(1).expand(-1, kept, -1).gather(2, nearest)
    weights = torch.zeros(bsz, kept, num_patches, dtype=features.dtype, device=features.device)
    weights.scatter_add_(2, positions, cls_attn.unsqueeze(1).expand(-1, kept, -1).gather(2, positions))
    updated = gather_tokens(features, idx) + torch.matmul(weights, features)
    extra = (gather_tokens(features, compl) * cls_attn.gather(1, compl).unsqueeze(-1)).sum(dim=1, keepdim=True)
    return updated, extra


def selected_and_last_layer_input(
    adapter: VisionEncoderAdapter, pixel_values: torch.Tensor, select_layer: int, early_exit: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected layer's output (B, N + 1, C) and the last layer's attention input (B, N + 1, C)."""
    select_index = adapter.layer_index(select_layer)
    last = adapter.num_layers - 1
    if select_index == last - 1:
        # the last layer's attention input is its pre-attention norm of the selected output
        capture = adapter.run(pixel_values, select_layer, capture_attn_input=False, early_exit=early_exit)
        return capture.hidden, adapter.layers[last].layer_norm1(capture.hidden)
    grabbed = {}

    def grab(module, args, output):
        grabbed["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.layers[select_index].register_forward_hook(grab)
    try:
        capture = adapter.run(pixel_values, -1, capture_attn_input=True, early_exit=early_exit)
    finally:
        handle.remove()
    return grabbed["hidden"], capture.attn_input


def prumerge_compress(
    adapter: VisionEncoderAdapter,
    hidden: torch.Tensor,
    last_input: torch.Tensor,
    plus: bool,
    mode: str,
    tokens: int,
    ratio: float,
    neighbours: int = NEIGHBOURS,
) -> CompressedTokens:
    """PruMerge / PruMerge+ on a captured pass: hidden (B, N + 1, C) the selected layer's output,
    last_input (B, N + 1, C) the last layer's attention input -> tokens (B, K + 1, C), kept tokens in
    sequence order (``keep_indices`` (B, K) encoder positions, CLS = 0 never kept), the extra token last."""
    attn = adapter.layers[-1].self_attn
    width = hidden.shape[-1]
    q_cls = attn.q_proj(last_input)[:, :1]  # all rows projected (same kernel as the official), one kept
    keys = attn.k_proj(last_input)
    logits = torch.matmul(q_cls, keys.transpose(1, 2)).squeeze(1) * width**-0.5
    cls_attn = torch.softmax(logits.float(), dim=-1)[:, 1:].to(hidden.dtype)  # (B, N)
    features = hidden[:, 1:]
    idx = prumerge_select(cls_attn, plus, mode, tokens, ratio)
    updated, extra = prumerge_merge(features, keys[:, 1:], cls_attn, idx, neighbours)
    order = idx.argsort(dim=1, stable=True)
    tokens_out = torch.cat([gather_tokens(updated, order), extra], dim=1)
    return CompressedTokens(tokens_out, idx.gather(1, order) + 1, has_cls=True, cls_kept=False)


# ----- reference re-enactment of the official code -------------------------------------------------
def official_prumerge_forward(vision_model, pixel_values: torch.Tensor, select_layer: int = -2) -> dict:
    """Step 1 of the official code: the eager tower with ``output_hidden_states`` and hooks on the last
    layer's ``q_proj`` / ``k_proj``. Returns ``features`` = ``hidden_states[select_layer]`` (B, N + 1, C)
    and the hooked ``q``, ``k`` (B, N + 1, C)."""
    adapter = encoder_adapter(vision_model)
    outputs = {}
    last = adapter.layers[-1].self_attn
    handles = [
        last.k_proj.register_forward_hook(lambda module, args, out: outputs.__setitem__("k", out)),
        last.q_proj.register_forward_hook(lambda module, args, out: outputs.__setitem__("q", out)),
    ]
    try:
        with attention_implementation(vision_model, "eager"):
            out = vision_model(pixel_values, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return {"features": out.hidden_states[select_layer], "q": outputs["q"], "k": outputs["k"]}


def official_prumerge(
    vision_model,
    pixel_values: torch.Tensor,
    plus: bool,
    if_adaptive: bool = True,
    reduction_ratio: float = 1 / 8,
    budget: int | None = None,
    select_layer: int = -2,
    forward: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``token_prune_merge_advanced(_plus)`` (42Shawn/LLaVA-PruMerge at 097c041,
    ``llava/model/multimodal_encoder/clip_encoder.py``) step by step: eager tower with hooks on the last
    layer's q / k projections, the full attention map, numpy IQR, Python loops over kept tokens. The
    official selection is batch-1: the tower runs on the batch, then each view is selected alone.
    ``budget``: our fixed-budget selection (module docstring) in place of steps 3-4; the merge is the
    official one. ``forward``: the tower pass of ``official_prumerge_forward`` on these pixels, to
    reuse it for several settings (the tower pass does not depend on them).

    Returns (tokens (B, K + 1, C) in the official order, idx (B, K) patch indices in that order).
    """
    if forward is None:
        forward = official_prumerge_forward(vision_model, pixel_values, select_layer)
    all_tokens, all_idx = [], []
    for view in range(forward["features"].shape[0]):  # the tower runs batched; the selection is batch-1
        image_features = forward["features"][view : view + 1, 1:]
        desired_q, desired_k = forward["q"][view : view + 1], forward["k"][view : view + 1]
        bsz, n, c = image_features.shape
        attn = F.softmax((desired_q @ desired_k.transpose(-2, -1)) * c**-0.5, dim=-1)
        cls_attn = attn[:, 0, 1:]
        if budget is not None:
            top = (budget - 1 + 1) // 2 if plus else budget - 1
            _, idx = torch.topk(cls_attn, top, dim=1, largest=True)
            if plus:
                taken = set(idx[0].tolist())
                rest = [p for p in range(n) if p not in taken]
                count = budget - 1 - top
                extra = [rest[((2 * j + 1) * len(rest)) // (2 * count)] for j in range(count)]
                idx = torch.cat([idx, torch.tensor([extra])], dim=1)
        else:
            ratio = reduction_ratio
            if if_adaptive:
                values = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
                q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
                ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
            _, idx = torch.topk(cls_attn, int(n * ratio), dim=1, largest=True)
            if plus:
                step_length = int(1 / ratio)
                if if_adaptive:
                    sequence = torch.arange(0, OFFICIAL_SEQUENCE_END, int(step_length / 3))
                    flat = idx.flatten()
                    kept = torch.tensor([x for x in sequence if x not in flat], dtype=idx.dtype)
                    idx = torch.cat((idx, kept.unsqueeze(0)), dim=1)
                else:
                    sequence = torch.arange(int(step_length / 2), OFFICIAL_SEQUENCE_END, int(step_length))
                    idx = torch.cat((idx[0], sequence)).unsqueeze(0)
        index = idx.unsqueeze(-1).expand(-1, -1, c)
        key_wo_cls = desired_k[:, 1:]
        x_others = torch.gather(image_features, 1, index)
        x_others_attn = torch.gather(cls_attn, 1, idx)
        key_others = torch.gather(key_wo_cls, 1, index)
        # complement_idx
        masked = torch.scatter(torch.arange(n).unsqueeze(0).expand(1, -1), -1, idx, 0)
        compl = torch.sort(masked, dim=-1).values[:, idx.shape[1] :]
        non_topk = torch.gather(image_features, 1, compl.unsqueeze(-1).expand(-1, -1, c))
        non_topk_key = torch.gather(key_wo_cls, 1, compl.unsqueeze(-1).expand(-1, -1, c))
        non_topk_attn = torch.gather(cls_attn, 1, compl)
        key_others_norm = F.normalize(key_others, p=2, dim=-1)
        non_topk_key_norm = F.normalize(non_topk_key, p=2, dim=-1)
        left = x_others.shape[1]
        updated = torch.zeros_like(x_others)
        for i in range(left):
            own = key_others_norm[0, i].view(1, 1, -1)
            rest_x = torch.cat([x_others[:, :i], x_others[:, i + 1 :], non_topk], dim=1)
            rest_attn = torch.cat([x_others_attn[:, :i], x_others_attn[:, i + 1 :], non_topk_attn], dim=1)
            rest_keys = torch.cat([key_others_norm[:, :i], key_others_norm[:, i + 1 :], non_topk_key_norm], dim=1)
            cos = torch.bmm(own, rest_keys.transpose(1, 2))
            _, cluster = torch.topk(cos, k=NEIGHBOURS, dim=2, largest=True)
            cluster = cluster.squeeze()
            weighted = torch.sum(rest_x[:, cluster, :] * rest_attn[:, cluster].unsqueeze(-1), dim=1)
            updated[0, i] = x_others[0, i] + weighted[0]
        extra_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
        all_tokens.append(torch.cat([updated, extra_token], dim=1))
        all_idx.append(idx)
    return torch.cat(all_tokens), torch.cat(all_idx)


# ----- the methods --------------------------------------------------------------------------------
@dataclass
class _PruMergeSettings(CompressionMethod):
    """Shared settings of PruMerge and PruMerge+ (see the module docstring).

    mode: "budget" (exactly ``tokens`` per view: ``tokens - 1`` kept + the extra token), "adaptive" (the
    paper: IQR outliers) or "fixed" (the official ``if_adaptive=False`` with ``ratio``).
    """

    stage: ClassVar[str] = "encoder_output"
    needs_attention_input: ClassVar[bool] = False
    plus: ClassVar[bool] = False

    mode: str = "budget"
    tokens: int = 64
    ratio: float = 0.125
    neighbours: int = NEIGHBOURS

    def validate(self):
        if self.mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {MODES}, got {self.mode!r}")
        self.tokens = check_count("tokens", self.tokens, minimum=3 if self.plus else 2)
        self.ratio = check_ratio("ratio", self.ratio)
        if self.ratio == 0:
            raise ValueError(f"{self.name}: ratio must be > 0, got {self.ratio}")
        self.neighbours = check_count("neighbours", self.neighbours)
        return self

    @classmethod
    def from_budget(cls, tokens: int):
        return cls(mode="budget", tokens=check_count("visual tokens", tokens, minimum=3 if cls.plus else 2))

    def check_training(self) -> None:
        if self.mode == "adaptive":
            raise ValueError(
                f"{self.name}:mode=adaptive keeps a number of tokens that depends on each image, which a training "
                f"batch (several images or anyres views in one call) cannot hold; train with a fixed budget "
                f"({self.name}:64) or {self.name}:mode=fixed"
            )

    def kept_per_view(self, num_patches: int) -> int | None:
        """Kept tokens per view (the extra token not counted); None when adaptive."""
        if self.mode == "budget":
            return self.tokens - 1
        if self.mode == "fixed":
            top = int(num_patches * self.ratio)
            return top + len(uniform_additions_fixed(self.ratio)) if self.plus else top
        return None

    def tokens_per_view(self, num_tokens: int | None = None) -> int | None:
        """``num_tokens``: the view's patch count (needed by the "fixed" mode); None when adaptive."""
        if self.mode == "budget":
            return self.tokens
        if self.mode == "fixed" and num_tokens is not None:
            return self.kept_per_view(num_tokens) + 1
        return None

    def label(self) -> str:
        if self.mode == "budget":
            return f"{self.name} {self.tokens}"
        return f"{self.name} {self.mode}" + (f" {self.ratio:g}" if self.mode == "fixed" else "")

    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        adapter.layer_index(select_layer)
        if not adapter.has_cls:
            raise ValueError(no_cls_position_reason(self.name, adapter))
        patches = adapter.num_patches
        if self.neighbours > patches - 1:
            raise ValueError(f"{self.name}: neighbours = {self.neighbours} exceeds the {patches - 1} other patches")
        if self.mode == "budget" and self.tokens > patches:
            raise ValueError(
                f"{self.name}: tokens = {self.tokens} exceeds the {patches} patch tokens of layer {select_layer} "
                f"({self.tokens - 1} kept + 1 merged extra token; at least one patch must be pruned)"
            )
        if self.mode == "fixed":
            top = int(patches * self.ratio)
            if top < 1 or top >= patches:
                raise ValueError(f"{self.name}: ratio = {self.ratio:g} keeps {top} of {patches} patches; need 1..{patches - 1}")
            if self.plus and len(uniform_additions_fixed(self.ratio)) != top:
                raise ValueError(
                    f"prumerge+ fixed mode: ratio = {self.ratio:g} gives {top} top tokens but "
                    f"{len(uniform_additions_fixed(self.ratio))} uniform samples; the official code needs "
                    "them equal (e.g. ratio 0.125)"
                )

    def compress(self, adapter: VisionEncoderAdapter, capture: EncoderCapture) -> CompressedTokens:
        """A pass captured by ``adapter.run`` at the second-to-last layer (LLaVA's -2; the last layer's
        attention input is then its ``layer_norm1`` of the capture) or at the last layer with its
        attention input; other layers need ``encode``, which captures what it needs."""
        last = adapter.num_layers - 1
        if capture.layer_index == last - 1:
            last_input = adapter.layers[last].layer_norm1(capture.hidden)
        elif capture.layer_index == last and capture.attn_input is not None:
            last_input = capture.attn_input
        else:
            raise ValueError(
                f"{self.name} scores with the last tower layer ({last}); a capture of layer {capture.layer_index} "
                "does not give its input: use encode()"
            )
        return prumerge_compress(
            adapter, capture.hidden, last_input, self.plus, self.mode, self.tokens, self.ratio, self.neighbours
        )

    def encode(
        self,
        adapter: VisionEncoderAdapter,
        pixel_values: torch.Tensor,
        select_layer: int = -2,
        early_exit: bool = True,
    ) -> CompressedTokens:
        self.check(adapter, select_layer)
        adapter.check_pixels(pixel_values)
        hidden, last_input = selected_and_last_layer_input(adapter, pixel_values, select_layer, early_exit)
        return prumerge_compress(
            adapter, hidden, last_input, self.plus, self.mode, self.tokens, self.ratio, self.neighbours
        )


def no_cls_position_reason(name: str, adapter: VisionEncoderAdapter) -> str:
    """Why ``check`` refuses an adapter whose token sequence has no CLS position (``has_cls`` False).

    PruMerge needs the CLS token at position 0 of the sequence it compresses: its query row ranks the
    other positions, and it is dropped from the output. A tower may have a CLS token that is still not
    part of that sequence (an adapter exposing derived tokens, such as pixel-shuffle units, reports
    ``tower_has_cls``); the message then says so instead of claiming the tower has none."""
    tower = type(adapter.model).__name__
    if getattr(adapter, "tower_has_cls", False):
        return (
            f"{name} ranks the tokens it compresses by the attention of a CLS token at position 0 of that "
            f"sequence; {tower} has a CLS token, but the sequence {type(adapter).__name__} hands to the methods "
            "has no CLS position (its tokens are derived from the patches, the CLS is not one of them)"
        )
    return f"{name} ranks patches by CLS attention; {tower} has no CLS token"


@register_method
@dataclass
class PruMerge(_PruMergeSettings):
    """LLaVA-PruMerge: CLS-attention outliers (or the top ``tokens - 1``), each merged with its 32 most
    key-similar tokens, plus one token merging all pruned ones."""

    name: ClassVar[str] = "prumerge"
    summary: ClassVar[str] = "CLS-attention outliers merged with their key-nearest tokens, + 1 merged token"
    reference: ClassVar[str] = "visionzip.methods.prumerge.official_prumerge"
    plus: ClassVar[bool] = False


@register_method
@dataclass
class PruMergePlus(_PruMergeSettings):
    """LLaVA-PruMerge+: PruMerge with spatially uniform samples added to the attention outliers."""

    name: ClassVar[str] = "prumerge+"
    summary: ClassVar[str] = "PruMerge + spatially uniform samples"
    reference: ClassVar[str] = "visionzip.methods.prumerge.official_prumerge"
    plus: ClassVar[bool] = True
