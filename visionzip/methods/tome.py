"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching inside the vision tower's layers.

Official code: facebookresearch/ToMe at af95e4b (``tome/merge.py``: ``bipartite_soft_matching``,
``merge_wavg``; ``tome/patch/timm.py``: ``ToMeBlock``, ``ToMeAttention``). It patches the classes of a
timm ViT; in every block:

1. attention on ``norm1(x)``, with proportional attention: the logits get ``+ log(size)`` per key, where
   ``size`` is how many original tokens a (merged) token stands for (``prop_attn``; no bias in the first
   block, where sizes are not yet known); the block also returns its keys averaged over heads, the metric;
2. ``x = x + attn``;
3. bipartite soft matching with ``r`` merges: the tokens are split alternately into sets A (even
   positions) and B (odd positions); each A token's most cosine-similar B token (by the metric) is its
   edge; the ``r`` A tokens with the strongest edges are merged into their B partners. The class token
   (position 0, in A) is protected (its scores are ``-inf``). Merging is size-weighted:
   ``x <- sum(size * x) / sum(size)``, sizes add up. The new sequence is ``[unmerged A (sorted by position
   when there is a class token), B]``;
4. ``x = x + mlp(norm2(x))``.

What we do, and why:

- We run the tower's own layer modules (``layer_norm1``, ``q_proj`` / ``k_proj`` / ``v_proj`` /
  ``out_proj``, ``layer_norm2``, ``mlp``) in our own loop, without patching any class, and the
  attention is ``F.scaled_dot_product_attention`` with ``log(size)`` as an additive bias (the official
  code is eager). No attention map is kept.
- The official ``r`` is a constant (or a schedule) for all blocks and is silently clamped to half of a
  block's mergeable tokens. LLaVA reads ``hidden_states[select_layer]`` (-2: the output of layer 23 of
  24), so we merge in the layers up to and including that one, and choose ``r`` per layer so that its
  output holds exactly the budget: ``P - T`` merges over ``L`` layers, ``(P - T) // L`` each, the
  remainder one more in the first layers (ToMe's paper finds front-loaded schedules no worse than
  constant). Where a layer's even share would exceed half of its input (the official clamp), that layer
  merges exactly half and the surplus moves to the layers before it (``tome_schedule``): on ViT-L/14-336
  at -2 this never binds for the papers' budgets (64 to 192), and it lets a shallow tower reach small
  budgets. A budget that would need more than half of the first layer's tokens is a ValueError naming the
  smallest budget the tower allows (instead of a silent clamp).
- Output: the selected layer's tokens without the class token (LLaVA's "patch" feature selection):
  ``tokens`` (B, T, C). A merged token has no single encoder position, so every token counts as merged:
  ``keep_indices`` has shape (B, 0) and ``cls_kept`` is False. On LLaVA-NeXT both layouts then append
  the crops' tokens crop after crop (the order ToMe leaves them in).
- With ``early_exit=False`` the layers after the selected one still run (without merging) so that a
  complete forward is seen (DeepSpeed ZeRO-3); their output is discarded.

The reference re-enactment ``official_tome`` below follows the official block step by step (eager
attention, the closures of ``bipartite_soft_matching`` / ``merge_wavg``) on the HF tower's weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..copied import copied_from
from ..encoders import VisionEncoderAdapter, encoder_adapter
from .base import CompressedTokens, CompressionMethod, check_count, gather_tokens, register_method


# ----- budget -> per-layer schedule ---------------------------------------------------------------
def tome_schedule(mergeable: int, tokens: int, merge_layers: int) -> list[int]:
    """Merges per layer so that ``mergeable`` tokens become ``tokens`` after ``merge_layers`` layers.

    An even split, ``(mergeable - tokens) // merge_layers`` each and the remainder one more in the first
    layers, except where a layer's share would exceed half of its input (ToMe's limit, which the official
    code clamps silently): such a layer merges as many tokens as it keeps (exactly half its input) and the
    surplus is split evenly over the layers before it. Built from the last layer backwards; without a
    binding limit it is the plain even split. Where even the first layer would need more than half of its
    input the schedule is returned as is, and ``schedule_violation`` names that layer."""
    schedule = [0] * merge_layers
    left, out = mergeable - tokens, tokens
    for layer in reversed(range(merge_layers)):
        # a layer whose output keeps `out` tokens can merge at most `out` (r <= (out + r) // 2)
        r = left if layer == 0 else min(left // (layer + 1), out)
        schedule[layer] = r
        left, out = left - r, out + r
    return schedule


def schedule_violation(schedule: list[int], mergeable: int) -> tuple[int, int, int] | None:
    """The first (layer, r, tokens) where ``r`` exceeds half of the layer's mergeable tokens, or None."""
    remaining = mergeable
    for layer, r in enumerate(schedule):
        if r > remaining // 2:
            return layer, r, remaining
        remaining -= r
    return None


def smallest_budget(mergeable: int, merge_layers: int) -> int:
    """The smallest budget whose schedule merges at most half of the tokens of every layer (each layer can
    at most halve its tokens, so it is about ``mergeable / 2 ** merge_layers``)."""
    for tokens in range(1, mergeable + 1):
        if schedule_violation(tome_schedule(mergeable, tokens, merge_layers), mergeable) is None:
            return tokens
    return mergeable


def check_tome_budget(adapter: VisionEncoderAdapter, tokens, select_layer: int) -> list[int]:
    """The per-layer schedule for ``tokens`` at ``select_layer``, or a ValueError naming the limit."""
    tokens = check_count("tokens", tokens)
    merge_layers = adapter.layer_index(select_layer) + 1
    mergeable = adapter.num_patches  # the class token, where there is one, is protected
    if tokens > mergeable:
        raise ValueError(f"tome: tokens = {tokens} exceeds the {mergeable} patch tokens of layer {select_layer}")
    schedule = tome_schedule(mergeable, tokens, merge_layers)
    violation = schedule_violation(schedule, mergeable)
    if violation is not None:
        layer, r, remaining = violation
        raise ValueError(
            f"tome: tokens = {tokens} needs r = {r} merges in tower layer {layer}, which holds {remaining} "
            f"mergeable tokens; ToMe merges at most half of them per layer ({remaining // 2}). The smallest "
            f"budget this tower allows at select_layer {select_layer} is {smallest_budget(mergeable, merge_layers)}"
        )
    return schedule


# ----- the pieces of one ToMe layer ---------------------------------------------------------------
def bipartite_matching(metric: torch.Tensor, r: int, protect_first: bool):
    """ToMe's bipartite soft matching on metric (B, N, d) -> (unmerged (B, Na - r), merged (B, r), their
    destinations (B, r)): indices into the A set (even positions) / the B set (odd positions). The
    matching is a discrete choice: no gradient flows through it (as the official ``torch.no_grad()``)."""
    metric = metric.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = torch.matmul(metric[:, ::2], metric[:, 1::2].transpose(1, 2))  # (B, Na, Nb)
    if protect_first:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unmerged, merged = edge_idx[:, r:], edge_idx[:, :r]
    destination = node_idx.gather(1, merged)
    if protect_first:  # keeps the class token first, as the official code does
        unmerged = unmerged.sort(dim=1).values
    return unmerged, merged, destination


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor, unmerged: torch.Tensor, merged: torch.Tensor, destination: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: x (B, N, C), size (B, N, 1) -> (B, N - r, C), (B, N - r, 1), in ToMe's order
    ``[unmerged A tokens ; B tokens]``."""
    channels = x.shape[-1]
    weighted = torch.cat([x * size, size], dim=-1)  # one gather / scatter for both
    set_a, set_b = weighted[:, ::2], weighted[:, 1::2]
    sources = gather_tokens(set_a, merged)
    set_b = set_b.scatter_reduce(1, destination.unsqueeze(-1).expand_as(sources), sources, reduce="sum")
    out = torch.cat([gather_tokens(set_a, unmerged), set_b], dim=1)
    new_size = out[..., channels:]
    return out[..., :channels] / new_size, new_size


# Copied from transformers v5.25.0, models/clip/modeling_clip.py, CLIPAttention.forward (q / k / v, out_proj),
# through SDPA with the size bias
@copied_from("transformers.models.clip.modeling_clip.CLIPAttention.forward", sha="3f72a88a31a4abfe", version="5.25.0")
def proportional_attention(attn, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's self-attention with ToMe's ``+ log(size)`` bias on the keys, through SDPA.

    attn: the layer's attention module (q/k/v/out projections); x: (B, N, C) its input (after
    ``layer_norm1``); size: (B, N, 1) or None. Returns the attention output (B, N, C) and the metric:
    the keys averaged over heads (B, N, d).
    """
    bsz, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(bsz, n, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(bsz, n, heads, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(bsz, n, heads, head_dim).transpose(1, 2)
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N)
    dropout = float(getattr(attn, "dropout", 0.0)) if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=float(attn.scale))
    out = attn.out_proj(out.transpose(1, 2).reshape(bsz, n, heads * head_dim))
    return out, k.mean(dim=1)


def tower_embeddings(adapter: VisionEncoderAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """The sequence entering the tower's first layer: embeddings (and CLIP's ``pre_layrnorm``)."""
    dtype = next(adapter.model.parameters()).dtype
    x = adapter.core.embeddings(pixel_values.to(dtype=dtype))
    pre_norm = getattr(adapter.core, "pre_layrnorm", None)
    return pre_norm(x) if pre_norm is not None else x


# Copied from transformers v5.25.0, models/clip/modeling_clip.py, CLIPEncoderLayer.forward: the residual
# blocks of each layer, with the merge between attention and MLP
@copied_from("transformers.models.clip.modeling_clip.CLIPEncoderLayer.forward", sha="5abe44518be779d4", version="5.25.0")
def tome_encode(
    adapter: VisionEncoderAdapter,
    pixel_values: torch.Tensor,
    schedule: list[int],
    select_layer: int = -2,
    prop_attn: bool = True,
    early_exit: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the tower with ToMe: ``schedule[i]`` merges in layer i (between attention and MLP).

    pixel_values: (B, 3, H, W). Returns the selected layer's output (B, N', C) (class token first where
    there is one) and the sizes (B, N', 1) of its tokens.
    """
    select_index = adapter.layer_index(select_layer)
    last = select_index if early_exit else adapter.num_layers - 1
    x = tower_embeddings(adapter, pixel_values)
    size = None
    selected = selected_size = None
    for index in range(last + 1):
        layer = adapter.layers[index]
        attn_out, metric = proportional_attention(
            layer.self_attn, layer.layer_norm1(x), size if prop_attn else None
        )
        x = x + attn_out
        r = schedule[index] if index < len(schedule) else 0
        if r > 0:
            if size is None:
                size = torch.ones_like(x[..., :1])
            x, size = merge_weighted(x, size, *bipartite_matching(metric, r, adapter.has_cls))
        x = x + layer.mlp(layer.layer_norm2(x))
        if index == select_index:
            selected, selected_size = x, size
    if selected_size is None:
        selected_size = torch.ones_like(selected[..., :1])
    return selected, selected_size


# ----- reference re-enactment of the official code -------------------------------------------------
# Copied from transformers v5.25.0, models/clip/modeling_clip.py, CLIPEncoderLayer.forward and
# CLIPAttention.forward (eager), as ToMe's timm blocks compute them
@copied_from("transformers.models.clip.modeling_clip.CLIPEncoderLayer.forward", sha="5abe44518be779d4", version="5.25.0")
@copied_from("transformers.models.clip.modeling_clip.CLIPAttention.forward", sha="3f72a88a31a4abfe", version="5.25.0")
def official_tome(
    vision_model,
    pixel_values: torch.Tensor,
    r: int | list[int],
    select_layer: int = -2,
    prop_attn: bool = True,
    margins: list | None = None,
) -> torch.Tensor:
    """The official ToMe block (facebookresearch/ToMe at af95e4b, ``tome/patch/timm.py`` ``ToMeBlock`` /
    ``ToMeAttention``, ``tome/merge.py`` ``bipartite_soft_matching`` / ``merge_wavg``) step by step, with
    eager attention, on a HF CLIP / SigLIP tower: ``hidden_states[select_layer]`` (B, N', C) with the
    class token first. ``r``: an int (the same in every layer) or a per-layer list (missing layers: 0),
    as the official ``parse_r``; each layer clamps it to half of its mergeable tokens, as the official.
    ``margins``: if a list, each merging layer appends the (B,) gap between the r-th and (r+1)-th strongest
    edge: how far the merge decision is from a tie (tests use it to tell float noise from a difference)."""
    adapter = encoder_adapter(vision_model)
    num_layers = adapter.num_layers
    schedule = [r] * num_layers if isinstance(r, int) else list(r) + [0] * (num_layers - len(r))
    protected = int(adapter.has_cls)
    x = tower_embeddings(adapter, pixel_values)
    size = None
    hidden_states = [x]
    for index, layer in enumerate(adapter.layers):
        # ToMeAttention.forward: eager attention with the proportional bias, returns k.mean(1)
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        bsz, n, _ = h.shape
        q = attn.q_proj(h).reshape(bsz, n, attn.num_heads, attn.head_dim).permute(0, 2, 1, 3)
        k = attn.k_proj(h).reshape(bsz, n, attn.num_heads, attn.head_dim).permute(0, 2, 1, 3)
        v = attn.v_proj(h).reshape(bsz, n, attn.num_heads, attn.head_dim).permute(0, 2, 1, 3)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        weights = logits.softmax(dim=-1)
        x_attn = attn.out_proj((weights @ v).transpose(1, 2).reshape(bsz, n, -1))
        metric = k.mean(1)
        x = x + x_attn
        # ToMeBlock.forward: bipartite_soft_matching + merge_wavg
        layer_r = min(schedule[index], (metric.shape[1] - protected) // 2)
        if layer_r > 0:
            with torch.no_grad():
                normed = metric / metric.norm(dim=-1, keepdim=True)
                a, b = normed[..., ::2, :], normed[..., 1::2, :]
                scores = a @ b.transpose(-1, -2)
                if protected:
                    scores[..., 0, :] = -math.inf
                node_max, node_idx = scores.max(dim=-1)
                edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
                if margins is not None:
                    ranked = node_max.sort(dim=-1, descending=True).values
                    margins.append(ranked[:, layer_r - 1] - ranked[:, layer_r])
                unm_idx = edge_idx[..., layer_r:, :]
                src_idx = edge_idx[..., :layer_r, :]
                dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
                if protected:
                    unm_idx = unm_idx.sort(dim=1)[0]

            def merge(t: torch.Tensor, mode: str, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx, layer_r=layer_r):
                src, dst = t[..., ::2, :], t[..., 1::2, :]
                nb, t1, c = src.shape
                unm = src.gather(dim=-2, index=unm_idx.expand(nb, t1 - layer_r, c))
                src = src.gather(dim=-2, index=src_idx.expand(nb, layer_r, c))
                dst = dst.scatter_reduce(-2, dst_idx.expand(nb, layer_r, c), src, reduce=mode)
                return torch.cat([unm, dst], dim=1)

            if size is None:
                size = torch.ones_like(x[..., 0, None])
            x = merge(x * size, mode="sum")
            size = merge(size, mode="sum")
            x = x / size
        x = x + layer.mlp(layer.layer_norm2(x))
        hidden_states.append(x)
    return hidden_states[select_layer]


# ----- the method ---------------------------------------------------------------------------------
@register_method
@dataclass
class ToMe(CompressionMethod):
    """ToMe: merge tokens inside the tower's layers (bipartite soft matching, size-weighted, with
    proportional attention) until the selected layer holds ``tokens`` tokens besides the class token."""

    name: ClassVar[str] = "tome"
    stage: ClassVar[str] = "tower"
    summary: ClassVar[str] = "bipartite soft matching in every tower layer up to the selected one"
    reference: ClassVar[str] = "visionzip.methods.tome.official_tome"
    needs_attention_input: ClassVar[bool] = False

    tokens: int = 64
    prop_attn: bool = True

    def validate(self):
        self.tokens = check_count("tokens", self.tokens)
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be true or false, got {self.prop_attn!r}")
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> ToMe:
        return cls(tokens=check_count("visual tokens", tokens))

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.tokens

    def label(self) -> str:
        return f"tome {self.tokens}"

    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        check_tome_budget(adapter, self.tokens, select_layer)

    def encode(
        self,
        adapter: VisionEncoderAdapter,
        pixel_values: torch.Tensor,
        select_layer: int = -2,
        early_exit: bool = True,
    ) -> CompressedTokens:
        schedule = check_tome_budget(adapter, self.tokens, select_layer)
        adapter.check_pixels(pixel_values)
        hidden, _ = tome_encode(adapter, pixel_values, schedule, select_layer, self.prop_attn, early_exit)
        tokens = hidden[:, int(adapter.has_cls) :]
        keep = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=tokens.device)
        return CompressedTokens(tokens, keep, adapter.has_cls, cls_kept=False)
