"""In-LLM token pruning on the decoder-only language models transformers ships: one decoder-layer loop for
``LlamaModel``, ``MistralModel``, ``Qwen2Model`` and Qwen2.5-VL's ``Qwen2_5_VLTextModel``, the language
models of every Hugging Face family in ``visionzip.hf`` (LLaVA-1.5 / NeXT / Video-LLaVA: Llama or Mistral;
LLaVA-OneVision, InternVL 2.5 / 3: Qwen2; Qwen2.5-VL: its own M-RoPE text model).

``pruned_decoder_forward(language_model, ...)`` runs the model's own layer modules (SDPA or whatever
attention the model was loaded with) the way ``visionzip.llm`` describes: in the prefill, before each of
``pruner.layers``, the pruner's keep mask over the current sequence (the attention rows it asks for are
computed from that layer's q and k only, ``score_rows``), the unkept tokens leave the hidden states,
positions and mask, and layers from there on cache only the kept tokens (a ``DynamicCache`` whose layers
hold different lengths). What each group of layers holds is recorded per cache (``pruned_prefix``), so
decoding and later chunks on that cache give each group its padding mask and positions.

Positions: 1D (B, N) for Llama / Mistral / Qwen2, M-RoPE (3, B, N) for Qwen2.5-VL; both are carried as
(P, B, N). A method that keeps positions (FastV) keeps all three M-RoPE components of each kept token. A
method that renumbers (PyramidDrop, SparseVLM) does on M-RoPE what it does on 1D positions, in every
component: a kept token's position drops by the valid tokens dropped before it (text tokens, whose three
components are equal, stay text-like; an image's kept tokens keep their relative (t, h, w) layout only
where no token between them was dropped); SparseVLM's re-insertion renumbers the sequence contiguously
from its first position. Decoding continues from the last prompt token's new position: later tokens'
positions are shifted by what the drops took off the last prompt token. The official code of these
methods is LLaMA-only (1D positions), so the M-RoPE form is our rule.

The HF families install it per instance (``visionzip.hf.base``): ``language_model.forward`` becomes an
instance attribute calling this loop with the visual positions of the prompt's placeholder tokens; no
class is patched. Our LLaVA stack's ``LlavaLlamaModel.pruned_forward`` calls this same loop, so every in-LLM
method runs one implementation in both paths (``tests/test_hf_llm_methods.py`` holds the paths' tokens equal).

Shapes: B batch, N sequence, P position rows (1 or 3), C hidden, H heads, Q query rows.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .copied import copied_from
from .llm import (
    AttentionRows,
    LLMTokenPruner,
    PrunedGroup,
    PrunedPrefix,
    PruningContext,
    Selection,
    attention_rows_from_qk,
    compact_positions,
    drop_tokens,
    insert_and_drop,
    last_valid_index,
)

# the language models whose forward this loop re-enacts (same layer interface, same cache, same masks)
SUPPORTED_LANGUAGE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen2_5_VLTextModel")

# the cache layers whose ``keys`` hold every token of the prefill as the layer computed them
_PLAIN_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)

# cache object -> what a pruned prefill left in it (the cache itself stays a transformers DynamicCache)
_PRUNED_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pruned_prefix(cache) -> PrunedPrefix | None:
    """What a pruned prefill left in ``cache`` (None when it holds every token in every layer)."""
    return None if cache is None else _PRUNED_PREFIXES.get(cache)


def check_language_model(language_model, method: str) -> None:
    """ValueError unless ``language_model`` is one whose decoder loop this module runs."""
    name = type(language_model).__name__
    if name not in SUPPORTED_LANGUAGE_MODELS:
        raise ValueError(
            f"{method} acts inside the language model (stage 'llm'), whose decoder loop visionzip runs for "
            f"{', '.join(SUPPORTED_LANGUAGE_MODELS)}; this model's language model is {name}"
        )


@dataclass
class PrunedDecoderOutput:
    """last_hidden_state: (B, M, C) after the final norm, the tokens left after the last drop (all of them
    when nothing was dropped); kept_index: (B, M) their positions in the input; kept_valid: (B, M) bool,
    False on re-padding slots; cache: the KV cache (None without ``use_cache``)."""

    last_hidden_state: torch.Tensor
    kept_index: torch.Tensor
    kept_valid: torch.Tensor
    cache: object = None


def _rows(positions: torch.Tensor) -> torch.Tensor:
    """Position ids as (P, B, N): (B, N) -> (1, B, N); M-RoPE (3, B, N) as is; (4, B, N) (Qwen2.5-VL's
    text row first, for packed masks) -> its three M-RoPE rows (our masks are always 2D padding masks)."""
    if positions.dim() == 2:
        return positions.unsqueeze(0)
    return positions[1:] if positions.shape[0] == 4 else positions


def _rope_positions(positions: torch.Tensor) -> torch.Tensor:
    """(P, B, N) -> what the model's rotary embedding takes: (B, N) for 1D, (3, B, N) for M-RoPE."""
    return positions[0] if positions.shape[0] == 1 else positions


def _gather(positions: torch.Tensor, dropped) -> torch.Tensor:
    """(P, B, N) positions at a drop's kept indices -> (P, B, M)."""
    return torch.stack([dropped.gather(row) for row in positions])


def _last_position(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) the first position row of each sample's last valid token (a text token: never dropped)."""
    return positions[0].gather(1, last_valid_index(valid).unsqueeze(1))[:, 0]


# Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaAttention.forward (and its Mistral,
# Qwen2 and Qwen2.5-VL twins): the q / k projections, the head split and RoPE, for the asked query rows only
@copied_from("transformers.models.llama.modeling_llama.LlamaAttention.forward", sha="32a79445373f688d", version="5.25.0")
@copied_from("transformers.models.mistral.modeling_mistral.MistralAttention.forward", sha="24e502aa3868e828", version="5.25.0")
@copied_from("transformers.models.qwen2.modeling_qwen2.Qwen2Attention.forward", sha="82422eb00b306b6b", version="5.25.0")
@copied_from(
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLAttention.forward", sha="c1a5de3fd978553a",
    version="5.25.0",
)
def score_rows(language_model, layer_index: int, hidden: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor, keys: Callable[[], torch.Tensor] | None = None) -> AttentionRows:
    """``PruningContext.attention_rows`` of decoder layer ``layer_index`` run on ``hidden`` (B, N, C), the
    sequence as it enters that layer (no cached past), positions (P, B, N), valid (B, N) bool: a function
    query_index (B, Q) -> (B, H, Q, N) float32 softmax attention of those rows, from that layer's q and k.
    ``keys``: () -> that layer's keys (``score_keys``: read from the prefill's cache where the layer has run);
    nothing is computed until the function is called (a pruner that reads no attention costs nothing)."""
    layer = language_model.layers[layer_index]
    attn = layer.self_attn
    batch = hidden.shape[0]
    head_dim = attn.head_dim
    keys = keys or score_keys(language_model, layer_index, hidden, positions)

    def rows(query_index: torch.Tensor) -> torch.Tensor:
        # only the asked rows are normed, projected and rotated (RMSNorm is per token)
        picked = hidden.gather(1, query_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        rope = _rope_positions(positions)
        cos, sin = language_model.rotary_emb(picked, rope.gather(-1, query_index.expand(*rope.shape[:-2], -1, -1)))
        queries = attn.q_proj(layer.input_layernorm(picked)).view(batch, query_index.shape[1], -1, head_dim).transpose(1, 2)
        queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
        return attention_rows_from_qk(queries, keys(), query_index, valid, attn.scaling)

    return rows


# Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaAttention.forward (and its twins, as
# ``score_rows``): the k projection and RoPE
@copied_from("transformers.models.llama.modeling_llama.LlamaAttention.forward", sha="32a79445373f688d", version="5.25.0")
@copied_from("transformers.models.mistral.modeling_mistral.MistralAttention.forward", sha="24e502aa3868e828", version="5.25.0")
@copied_from("transformers.models.qwen2.modeling_qwen2.Qwen2Attention.forward", sha="82422eb00b306b6b", version="5.25.0")
@copied_from(
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLAttention.forward", sha="c1a5de3fd978553a",
    version="5.25.0",
)
def score_keys(language_model, layer_index: int, hidden: torch.Tensor, positions: torch.Tensor, cache=None):
    """``PruningContext.keys`` of decoder layer ``layer_index`` run on ``hidden`` (B, N, C) at positions
    (P, B, N): a function () -> (B, Hkv, N, D), RoPE applied, computed only when a pruner asks (DART).
    ``cache``: this prefill's KV cache after that layer ran on ``hidden`` (a drop scored by an earlier layer:
    FastV, DART, SparseVLM): its keys are these (the layer computed them with the same modules on the same
    input), read instead of projecting all N tokens again (a twelfth of a Llama layer's FLOPs)."""
    layer = language_model.layers[layer_index]
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    memo: list[torch.Tensor] = []

    def keys() -> torch.Tensor:
        if not memo:
            memo.append(_cached_keys(cache, layer_index, length) if cache is not None else None)
            if memo[0] is None:
                normed = layer.input_layernorm(hidden)
                cos, sin = language_model.rotary_emb(hidden, _rope_positions(positions))
                states = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
                memo[0] = apply_rotary_pos_emb(states, states, cos, sin)[1]
        return memo[0]

    return keys


def _cached_keys(cache, layer_index: int, length: int) -> torch.Tensor | None:
    """The keys (B, Hkv, N, D) a plain dynamic cache holds for layer ``layer_index``, if they are ``length``
    long (the prefill's own: pruning happens only on an empty cache); None for any other cache kind."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_index >= len(layers) or type(layers[layer_index]) not in _PLAIN_CACHE_LAYERS:
        return None
    keys = getattr(layers[layer_index], "keys", None)
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[2] != length:
        return None
    return keys


def _check_windows(language_model, total: int) -> None:
    """Sliding-window layers see the same keys as full-attention ones while the sequence fits the window;
    beyond it the window would count cached (kept) tokens, not the original ones: refused by name."""
    config = language_model.config
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and (
        "sliding_attention" in (getattr(config, "layer_types", None) or ()) or type(language_model).__name__ == "MistralModel"
    )
    if sliding and total > window:
        raise ValueError(
            f"the pruned decoder loop runs sliding-window layers as full attention, which is exact only while the "
            f"sequence ({total} tokens) fits the window (sliding_window = {window})"
        )


# Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaModel.forward (and MistralModel,
# Qwen2Model, Qwen2_5_VLTextModel .forward): the cache, the causal mask, the rotary embedding and the
# decoder-layer loop, with drops between layers
@copied_from("transformers.models.llama.modeling_llama.LlamaModel.forward", sha="41090f72fd803409", version="5.25.0")
@copied_from("transformers.models.mistral.modeling_mistral.MistralModel.forward", sha="f531191dbe83a338", version="5.25.0")
@copied_from("transformers.models.qwen2.modeling_qwen2.Qwen2Model.forward", sha="e6bb0dda7c4ee8be", version="5.25.0")
@copied_from(
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLTextModel.forward", sha="53c3eb4fd98c29e2",
    version="5.25.0",
)
def pruned_decoder_forward(
    language_model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache=None,
    use_cache: bool | None = None,
    visual_mask: torch.Tensor | None = None,
    pruner: LLMTokenPruner | None = None,
) -> PrunedDecoderOutput:
    """The decoder stack of ``language_model`` (one of ``SUPPORTED_LANGUAGE_MODELS``) with in-LLM pruning.

    inputs_embeds: (B, N, C); attention_mask: (B, past + N) 2D padding mask over the caller's index space
    (None: all valid); position_ids: (B, N), or (3, B, N) / (4, B, N) M-RoPE (None: past .. past + N - 1);
    visual_mask: (B, N) bool, where the visual tokens sit. Prefill (empty cache, a pruner, visual tokens):
    drops before ``pruner.layers``; later calls on that cache: each group of layers gets the mask and
    positions of the tokens it holds. Later chunks are never pruned.
    """
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    config = language_model.config
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    past = cache.get_seq_length(0) if cache is not None else 0
    state = pruned_prefix(cache)
    first = state.group_of(0) if state is not None else None
    if first is not None:  # a drop before layer 0 (CDPruner): past counts the caller's tokens, not layer 0's
        past += state.prefix_length - first.kept_index.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("the pruned decoder loop takes a 2D padding attention_mask (B, past + N), not a prepared mask")
    attention_mask = attention_mask.bool()
    if attention_mask.shape[1] != past + length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions; the cache holds {past} and the input {length}"
        )
    _check_windows(language_model, past + length)
    if position_ids is None:
        position_ids = torch.arange(past, past + length, device=device).expand(batch, -1)
    position_ids = _rows(position_ids).expand(-1, batch, -1)
    prune = pruner is not None and visual_mask is not None and past == 0 and state is None and bool(visual_mask.any())
    drop_layers = tuple(pruner.layers) if prune else ()
    score_layers = {pruner.score_layer(layer): layer for layer in drop_layers}
    for score, drop in score_layers.items():
        if any(score < other < drop for other in drop_layers):
            raise ValueError(f"pruner scores the drop at layer {drop} by layer {score}, across another drop")

    hidden = inputs_embeds
    key_mask, positions = attention_mask, position_ids
    valid = attention_mask[:, past:]
    index = torch.arange(length, device=device).expand(batch, -1)
    visual = visual_mask.bool() & valid if prune else None
    initial_visual = visual.sum(dim=1) if prune else None
    input_visual = visual
    shift = torch.zeros(batch, dtype=torch.long, device=device)
    groups: list[PrunedGroup] = []
    snapshots = {}
    memo: dict = {}  # PruningContext.memo: shared by this prefill's selections
    causal_mask = position_embeddings = None
    for layer_index, decoder_layer in enumerate(language_model.layers[: config.num_hidden_layers]):
        # the mask and the rotary tables are built before layer 0 and again only where the sequence changes
        # (not ``causal_mask is None``: None is what create_causal_mask returns for SDPA without padding,
        # and asking again at every layer costs a host sync and the rotary tables each time)
        changed = layer_index == 0
        if layer_index in drop_layers:
            # the sequence as it entered the scoring layer (this one: as it is now)
            hidden_in, positions_in, valid_in = snapshots.pop(layer_index, (hidden, positions, valid))
            score = pruner.score_layer(layer_index)
            # a scoring layer that has run cached its keys of this very sequence (see score_keys)
            keys = score_keys(language_model, score, hidden_in, positions_in, cache if score < layer_index else None)
            context = PruningContext(
                layer_index, visual, valid, initial_visual,
                score_rows(language_model, score, hidden_in, positions_in, valid_in, keys),
                hidden=hidden, input_index=index, inputs_embeds=inputs_embeds, input_visual_mask=input_visual,
                keys=keys, final_norm=language_model.norm, memo=memo,
            )
            # named ranges: a profiler (``python -m llava.bench.prefill --breakdown``) tells selection from drop
            with torch.profiler.record_function("visionzip.prune.select"):
                selection = pruner.select(context)
            with torch.profiler.record_function("visionzip.prune.drop"):
                last_before = _last_position(positions, valid)
                if isinstance(selection, Selection):
                    # tokens inserted (recycled) after the kept ones: positions renumbered contiguously
                    keep = selection.keep & valid
                    count = selection.extra.shape[1]
                    dropped = insert_and_drop(keep, selection.extra_valid, selection.insert_after)
                    start = positions.masked_fill(~valid, torch.iinfo(positions.dtype).max).min(dim=2).values  # (P, B)
                    anchor = index.gather(1, selection.insert_after.unsqueeze(1)).expand(-1, count)
                    hidden = dropped.gather(torch.cat([hidden, selection.extra.to(hidden.dtype)], dim=1))
                    index = dropped.gather(torch.cat([index, anchor], dim=1))
                    visual = dropped.gather(torch.cat([visual, selection.extra_valid], dim=1)) & dropped.valid
                    valid = key_mask = dropped.valid
                    positions = (start.unsqueeze(-1) + valid.long().cumsum(dim=1) - 1).clamp_min(0)
                else:
                    keep = selection & valid
                    if not pruner.keep_original_positions:
                        positions = compact_positions(positions, keep, valid)
                    dropped = drop_tokens(keep)
                    hidden, positions, index = dropped.gather(hidden), _gather(positions, dropped), dropped.gather(index)
                    visual = dropped.gather(visual) & dropped.valid
                    valid = key_mask = dropped.valid
                shift = shift + last_before - _last_position(positions, valid)
                groups.append(PrunedGroup(layer_index, index, valid, shift.clone()))
            changed = True
        elif state is not None and any(group.start == layer_index for group in state.groups):
            group = state.group_of(layer_index)
            key_mask = group.key_mask(attention_mask, state.prefix_length)
            positions = position_ids - group.position_shift.view(1, -1, 1)
            changed = True
        if layer_index in score_layers and score_layers[layer_index] != layer_index:
            snapshots[score_layers[layer_index]] = (hidden, positions, valid)  # entering the scoring layer
        if changed:
            causal_mask = create_causal_mask(
                config=config, inputs_embeds=hidden, attention_mask=key_mask, cache=cache,
                position_ids=positions[0] if positions.shape[0] == 1 else None, layer_idx=layer_index,
            )
            position_embeddings = language_model.rotary_emb(hidden, _rope_positions(positions))
        hidden = decoder_layer(
            hidden,
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            position_ids=positions[0] if positions.shape[0] == 1 else None,
            cache=cache,
            use_cache=use_cache,
        )
    if groups and cache is not None:
        _PRUNED_PREFIXES[cache] = PrunedPrefix(length, groups)
    return PrunedDecoderOutput(language_model.norm(hidden), index, valid, cache if use_cache else None)
