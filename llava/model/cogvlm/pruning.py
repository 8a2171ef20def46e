"""In-LLM token pruning (FastV, PyramidDrop, SparseVLM, DART, CDPruner, DivPrune) inside CogVLM's decoder.

The methods' pruners (``CompressionMethod.llm_pruner``, the protocol of ``visionzip.llm``) run here as in the
shared decoder loop (``visionzip.decoder_loop``, which runs LLaMA-style layers only): before each of
``pruner.layers`` in the prefill, the pruner's keep mask over the current sequence; the attention rows it asks
for come from the scoring layer's q and k only; the unkept tokens leave the hidden states, positions, masks and
later layers' caches (per-layer KV caches of different lengths). What CogVLM adds:

- **experts**: the attention rows and keys are computed with each token's own expert QKV; a kept token keeps
  its expert (the routing mask is gathered with the tokens, not recomputed from neighbours); tokens a method
  inserts (SparseVLM's recycled clusters) are image tokens and take the vision expert;
- **visual tokens**: the image's patch tokens (boi and eoi are framing and never dropped);
- **positions**: a method that keeps positions (FastV) keeps each token's; one that renumbers (PyramidDrop,
  SparseVLM) renumbers by CogVLM's own rule (``cogvlm_position_ids`` on the kept token types): since the
  patches share one position, dropping some of them moves nothing, and the text moves back by one position
  only if every patch is dropped (boi and eoi become adjacent). No official in-LLM code exists for CogVLM
  (VisPruner's Table 4 reports FastV on CogVLM without code): this is our definition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip.llm import (
    PrunedGroup,
    PrunedPrefix,
    PruningContext,
    Selection,
    attention_rows_from_qk,
    drop_tokens,
    insert_and_drop,
    last_valid_index,
)

from .ops import (
    VISION_TOKEN_TYPE,
    attention_bias,
    cogvlm_position_ids,
    rotate_half,
    route,
    vision_expert_mask,
)


@dataclass
class PrunedState:
    """What a pruned prefill leaves for decoding: the prefix (``PrunedPrefix``: per group of layers the prefix
    tokens it holds and its position shift); hidden (B, M, C) after the final norm; valid (B, M)."""

    prefix: PrunedPrefix
    hidden: torch.Tensor
    valid: torch.Tensor


def image_patch_mask(token_type_ids: torch.Tensor, vision_type: int) -> torch.Tensor:
    """(B, L) -> (B, L) bool: the image tokens between boi and eoi (the visual tokens pruners rank)."""
    vision = token_type_ids == vision_type
    before = torch.cat([torch.zeros_like(vision[:, :1]), vision[:, :-1]], dim=1)
    after = torch.cat([vision[:, 1:], torch.zeros_like(vision[:, :1])], dim=1)
    return vision & before & after


def layer_qk(layer, hidden: torch.Tensor, vision: torch.Tensor, positions: torch.Tensor):
    """q, k (B, H, N, d), RoPE applied, of a decoder layer on its input ``hidden`` (B, N, C), each token
    through its expert's QKV (``vision`` (B, N) bool)."""
    attn = layer.self_attn
    bsz, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    qkv = route(normed, vision, attn.vision_expert_query_key_value, attn.language_expert_query_key_value, 3 * attn.hidden_size)
    q, k, _ = (t.view(bsz, length, attn.num_heads, attn.head_dim).transpose(1, 2) for t in qkv.split(attn.hidden_size, -1))
    cos, sin = attn.rotary_emb.cos_sin(positions, q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _scorer(layer, hidden, vision, positions, valid):
    """(rows, keys) for ``PruningContext``: computed once, when the pruner first asks."""
    memo: list = []

    def qk():
        if not memo:
            memo.append(layer_qk(layer, hidden, vision, positions))
        return memo[0]

    def rows(query_index: torch.Tensor) -> torch.Tensor:
        q, k = qk()
        picked = q.gather(2, query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        return attention_rows_from_qk(picked, k, query_index, valid, layer.self_attn.head_dim**-0.5)

    return rows, lambda: qk()[1]


def _last_position(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return positions.gather(1, last_valid_index(valid).unsqueeze(1))[:, 0]


def pruned_prefill(model, spliced, pruner, cache) -> PrunedState:
    """The decoder on a spliced prompt (``CogVLMForCausalLM.splice``) with the pruner's drops; ``cache``: an
    empty ``DynamicCache`` (filled per layer with the tokens that layer kept)."""
    layers = model.model.layers
    hidden = spliced.inputs_embeds
    types = spliced.token_type_ids
    positions = spliced.position_ids
    valid = spliced.attention_mask.bool()
    batch, length, _ = hidden.shape
    vision = vision_expert_mask(types)
    visual = image_patch_mask(types, VISION_TOKEN_TYPE) & valid
    initial_visual = visual.sum(dim=1)
    input_visual = visual
    index = torch.arange(length, device=hidden.device).expand(batch, -1)
    drop_layers = tuple(pruner.layers) if bool(visual.any()) else ()
    score_layers = {pruner.score_layer(layer): layer for layer in drop_layers}
    shift = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    groups: list[PrunedGroup] = []
    snapshots = {}
    for layer_index, layer in enumerate(layers):
        if layer_index in drop_layers:
            hidden_in, positions_in, valid_in, vision_in = snapshots.pop(layer_index, (hidden, positions, valid, vision))
            rows, keys = _scorer(layers[pruner.score_layer(layer_index)], hidden_in, vision_in, positions_in, valid_in)
            context = PruningContext(
                layer_index, visual, valid, initial_visual, rows, hidden=hidden, input_index=index,
                inputs_embeds=spliced.inputs_embeds, input_visual_mask=input_visual, keys=keys,
                final_norm=model.model.norm,
            )
            selection = pruner.select(context)
            last_before = _last_position(positions, valid)
            if isinstance(selection, Selection):
                keep = selection.keep & valid
                count = selection.extra.shape[1]
                dropped = insert_and_drop(keep, selection.extra_valid, selection.insert_after)
                anchor = index.gather(1, selection.insert_after.unsqueeze(1)).expand(-1, count)
                extra_types = torch.full((batch, count), VISION_TOKEN_TYPE, dtype=types.dtype, device=types.device)
                hidden = dropped.gather(torch.cat([hidden, selection.extra.to(hidden.dtype)], dim=1))
                index = dropped.gather(torch.cat([index, anchor], dim=1))
                visual = dropped.gather(torch.cat([visual, selection.extra_valid], dim=1)) & dropped.valid
                vision = dropped.gather(torch.cat([vision, selection.extra_valid], dim=1)) & dropped.valid
                types = dropped.gather(torch.cat([types, extra_types], dim=1))
                valid = dropped.valid
                positions = cogvlm_position_ids(types, valid)
            else:
                keep = selection & valid
                dropped = drop_tokens(keep)
                hidden, index, types = dropped.gather(hidden), dropped.gather(index), dropped.gather(types)
                visual = dropped.gather(visual) & dropped.valid
                vision = dropped.gather(vision) & dropped.valid
                valid = dropped.valid
                positions = dropped.gather(positions) if pruner.keep_original_positions else cogvlm_position_ids(types, valid)
            shift = shift + last_before - _last_position(positions, valid)
            groups.append(PrunedGroup(layer_index, index, valid, shift.clone()))
        if layer_index in score_layers and score_layers[layer_index] != layer_index:
            snapshots[score_layers[layer_index]] = (hidden, positions, valid, vision)
        hidden = layer(hidden, vision, positions, attention_bias(valid.long(), hidden.shape[1]), cache)
    return PrunedState(PrunedPrefix(length, groups), model.model.norm(hidden), valid)


def pruned_decode_step(model, prefix: PrunedPrefix, embeds, caller_mask, caller_positions, cache):
    """One decoding step over a pruned cache: embeds (B, 1, C) of the new (text) tokens; caller_mask
    (B, prefix + decoded) in the prompt's index space; caller_positions (B, 1) in the prompt's numbering.
    Each group of layers gets the mask of the prefix tokens it holds and its shifted positions."""
    vision = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    hidden = embeds
    bias, positions, current = None, caller_positions, "caller"
    for layer_index, layer in enumerate(model.model.layers):
        group = prefix.group_of(layer_index)
        key = "caller" if group is None else group.start
        if bias is None or key != current:
            if group is None:
                mask = caller_mask.bool()
                positions = caller_positions
            else:
                mask = group.key_mask(caller_mask, prefix.prefix_length)
                positions = caller_positions - group.position_shift.view(-1, 1)
            bias, current = attention_bias(mask.long(), hidden.shape[1]), key
            if bias is None:
                bias = False  # every key real: plain attention (kept distinct from "not built yet")
        hidden = layer(hidden, vision, positions, None if bias is False else bias, cache)
    return model.model.norm(hidden)
