"""Re-enactment of the official VisionZip Qwen2.5-VL code path, the reference the adapter is tested against.

Source: dvlab-research/VisionZip at 68993a3, ``Qwen2_5_VL/qwen2_5vl_visionzip.py`` (a hand-edited copy of
transformers 4.49.0's ``modeling_qwen2_5_vl.py``): ``Qwen2_5_VisionTransformerPretrainedModel.forward``
(scores and keys of the last block), ``Qwen2_5_VLVisionAttention.forward`` (eager; returns the attention
weights and keys of that block) and ``Qwen2_5_VLForConditionalGeneration.forward`` (selection, merging and
the cut of embeddings and positions). Written anew here, step by step as the official code computes it,
on the weights of a transformers 5.x ``Qwen2_5_VLForConditionalGeneration``; eager attention, batch 1,
one image, prefill only.

What the official code does, and where the adapter (``visionzip.hf.qwen2_5_vl``) differs and why:

- Batch 1 only: it reads ``input_ids[0]`` and cuts the span from the first to the last image placeholder;
  with several images in a sample it selects jointly over all their tokens with one budget and would
  overwrite the text between them. The adapter selects per image (a per-image budget, as VisionZip's
  LLaVA code) and handles padded batches and images of different sizes.
- Budget: ``int(0.65 n)`` dominant and ``max(int(0.05 n), 1)`` contextual of the image's n merged tokens,
  hard-coded (its README says 0.45). Here and in the adapter the counts are parameters
  (``official_ratio_counts`` gives the official ones).
- Attention: eager and FlashAttention-2 only (its SDPA vision attention does not return the weights); its
  FlashAttention-2 path scores with an unmasked softmax over all patches of the batch, equal to the eager
  path only for one single-frame image. The adapter recomputes the block's attention from q and k over the
  sequences the block attends, as the eager path, and leaves the tower's own kernels alone.
- Scores are summed over queries; the adapter averages over queries and multiplies by the sequence length
  (the same numbers up to rounding).
- Positions: it cuts ``position_ids`` of the uncompressed layout to the kept tokens; so does the adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from .qwen2_5_vl import official_ratio_counts


@dataclass
class OfficialQwenOutput:
    """keep: (K,) raster indices of the kept merged tokens, ascending; image_tokens: (K, hidden) the kept
    embeddings as the LLM sees them; position_ids: (3, 1, L_kept); logits: (1, L_kept, vocab)."""

    keep: torch.Tensor
    image_tokens: torch.Tensor
    position_ids: torch.Tensor
    logits: torch.Tensor


def _rotary_position_embeddings(visual, grid_thw: torch.Tensor) -> torch.Tensor:
    """The official ``rot_pos_emb``: (h, w) of every patch, grouped by merge unit, -> (N, head_dim / 2)."""
    merge = visual.spatial_merge_size
    position = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h)[:, None].expand(h, w).reshape(h // merge, merge, w // merge, merge)
        cols = torch.arange(w)[None, :].expand(h, w).reshape(h // merge, merge, w // merge, merge)
        pairs = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
        position.append(pairs.repeat(t, 1))
    position = torch.cat(position)
    head_dim = visual.config.hidden_size // visual.config.num_heads
    dim = head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = torch.outer(torch.arange(int(grid_thw[:, 1:].max()), dtype=torch.float), inv_freq)
    return freqs[position].flatten(1)


def _window_index(visual, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The official ``get_window_index``: merge units in window order, and the window boundaries."""
    merge = visual.spatial_merge_size
    side = visual.window_size // merge // visual.patch_size
    index, bounds, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        grid = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = side - gh % side, side - gw % side
        padded = F.pad(grid, (0, pad_w, 0, pad_h), "constant", -100)
        nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
        padded = padded.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, side, side)
        lengths = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        bounds.extend((lengths.cumsum(0) * merge * merge + bounds[-1]).tolist())
        offset += t * gh * gw
    return torch.cat(index), bounds


def _block_mask(cu_seqlens: list[int], n: int, dtype) -> torch.Tensor:
    mask = torch.full((1, n, n), torch.finfo(dtype).min, dtype=dtype)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        mask[..., start:end, start:end] = 0
    return mask


def _eager_block(block, hidden, cu_seqlens, cos_sin, return_weights: bool):
    """One vision block as the official eager ``Qwen2_5_VLVisionAttention`` runs it: (hidden, weights (H, N, N),
    keys (H, N, d)) with weights and keys only for ``return_weights``."""
    attn = block.attn
    n = hidden.shape[0]
    x = block.norm1(hidden)
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *cos_sin)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    weights = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(attn.head_dim) + _block_mask(cu_seqlens, n, q.dtype)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = attn.proj(torch.matmul(weights, v).transpose(0, 1).reshape(n, -1))
    hidden = hidden + out
    hidden = hidden + block.mlp(block.norm2(hidden))
    return hidden, (weights if return_weights else None), (k if return_weights else None)


def official_vision(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """The official tower forward: merged embeddings (n, hidden) in raster order, per-unit scores (n,) and
    the merge metric (1, n, d), as ``Qwen2_5_VisionTransformerPretrainedModel.forward`` returns them."""
    visual = model.model.visual
    unit = visual.spatial_merge_unit
    hidden = visual.patch_embed(pixel_values.type(visual.dtype))
    rotary = _rotary_position_embeddings(visual, grid_thw)
    window_index, window_bounds = _window_index(visual, grid_thw)
    window_bounds = torch.unique_consecutive(torch.tensor(window_bounds)).tolist()
    n = hidden.shape[0]
    hidden = hidden.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
    rotary = rotary.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
    emb = torch.cat([rotary, rotary], dim=-1)
    cos_sin = (emb.cos(), emb.sin())
    sequences = F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0), (1, 0)).tolist()
    last = len(visual.blocks) - 1
    for index, block in enumerate(visual.blocks):
        bounds = sequences if index in visual.fullatt_block_indexes else window_bounds
        hidden, weights, keys = _eager_block(block, hidden, bounds, cos_sin, index == last)
    reverse = torch.argsort(window_index)
    merged = visual.merger(hidden)[reverse]
    scores = weights.mean(dim=0).sum(dim=0)
    scores = scores.view(scores.shape[0] // 4, -1).mean(dim=-1)[reverse]
    keys = keys.view(keys.shape[0], keys.shape[1] // 4, 4, keys.shape[-1]).mean(dim=2)
    keys = keys[:, reverse, :].mean(dim=0).unsqueeze(0)
    return merged, scores, keys


@torch.no_grad()
def official_qwen2_5_vl(
    model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
    dominant: int | None = None, contextual: int | None = None,
) -> OfficialQwenOutput:
    """The official prefill for one sample with one image: input_ids (1, L) with the image's n uncompressed
    placeholders, pixel_values and image_grid_thw (1, 3) as the processor gives them. ``dominant`` /
    ``contextual``: None for the official 0.65 / 0.05 of n."""
    if input_ids.shape[0] != 1 or image_grid_thw.shape[0] != 1:
        raise ValueError("the official Qwen2.5-VL code path runs one sample with one image")
    config = model.config
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    image_embeds, scores, keys = official_vision(model, pixel_values, image_grid_thw)
    is_image = input_ids == config.image_token_id
    embeds = embeds.masked_scatter(is_image[..., None].expand_as(embeds), image_embeds.to(embeds.dtype))
    # positions of the uncompressed layout (transformers' own get_rope_index, equal to 4.49's for images)
    position_ids, _ = type(inner).get_rope_index(inner, input_ids, is_image.int(), image_grid_thw=image_grid_thw)

    n = scores.shape[0]
    official_dominant, official_contextual = official_ratio_counts(n)
    dominant_num = official_dominant if dominant is None else dominant
    contextual_num = official_contextual if contextual is None else contextual
    top = torch.topk(scores, dominant_num).indices
    is_top = torch.zeros_like(scores, dtype=torch.bool)
    is_top[top] = True
    rest = ~is_top
    metric = keys[:, rest]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, metric.shape[1] // contextual_num)
    targets = torch.arange(0, metric.shape[1], step)[:contextual_num]
    others = ~torch.isin(torch.arange(metric.shape[1]), targets)
    similarity = torch.bmm(metric[:, others], metric[:, targets].transpose(1, 2))
    one_hot = torch.zeros(1, int(others.sum()), contextual_num, dtype=scores.dtype)
    one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    selected = is_top.clone()
    rest_positions = rest.nonzero(as_tuple=True)[0]
    selected[rest_positions[targets]] = True

    span = is_image[0].nonzero(as_tuple=True)[0]
    first, last = int(span[0]), int(span[-1])
    keep_row = torch.ones_like(is_image[0])
    keep_row[first : last + 1] = selected
    image_part = embeds[:, first : last + 1][:, rest]
    merged = torch.bmm(one_hot.transpose(1, 2), image_part[:, others]) / counts
    embeds[:, rest_positions[targets] + first] = image_part[:, targets] + merged
    position_ids = position_ids[:, :, keep_row]
    embeds = embeds[:, keep_row]
    hidden = inner.language_model(input_ids=None, inputs_embeds=embeds, position_ids=position_ids).last_hidden_state
    return OfficialQwenOutput(
        keep=selected.nonzero(as_tuple=True)[0], image_tokens=embeds[0, first : first + int(selected.sum())],
        position_ids=position_ids, logits=model.lm_head(hidden),
    )
