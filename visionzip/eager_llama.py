"""Eager re-runs of a LLaMA decoder stack, for the reference re-enactments of the official in-LLM methods.

The official FastV / PyramidDrop / SparseVLM code runs LLaVA's LLaMA (transformers 4.31-4.37) with eager
attention and reads each layer's full attention map. These helpers run the same computation on a
transformers-5 ``LlamaModel``'s own modules (norms, projections, MLP, rotary embedding), one sample at a
time and unpadded as the official code does, returning the attention map next to the layer output. Only
the references use them; the fast path computes the attention rows it needs and keeps SDPA.

Shapes: N sequence, C hidden, H heads, D head dim.
"""
from __future__ import annotations

import torch

from .copied import copied_from


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' LLaMA RoPE, imported on first use: every method module imports this one, and
    transformers' LLaMA module costs seconds to import, which a budget look-up (``python -m
    llava.eval.budgets`` in every eval script) or ``merge_answers`` never needs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope

    return rope(q, k, cos, sin)


def causal_additive_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(1, 1, N, N): 0 where key <= query, the dtype's minimum elsewhere (the 4.3x eager mask)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)[None, None]


# Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaDecoderLayer.forward,
# LlamaAttention.forward and eager_attention_forward: one layer, eagerly, returning the attention map
@copied_from("transformers.models.llama.modeling_llama.LlamaDecoderLayer.forward", sha="6638598f45b2c79d", version="5.25.0")
@copied_from("transformers.models.llama.modeling_llama.LlamaAttention.forward", sha="32a79445373f688d", version="5.25.0")
@copied_from("transformers.models.llama.modeling_llama.eager_attention_forward", sha="ca07257165d5e0f8", version="5.25.0")
def eager_layer(model, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor):
    """Run decoder layer ``layer_index`` of ``model`` (a ``LlamaModel``) eagerly on one sample.

    hidden: (1, N, C); position_ids: (1, N) -> (output (1, N, C), attention (1, H, N, N) after softmax).
    Causal mask only (one unpadded sample, as the official batch-1 code runs).
    """
    layer = model.layers[layer_index]
    attn = layer.self_attn
    length = hidden.shape[1]
    head_dim = attn.head_dim
    residual = hidden
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)
    cos, sin = model.rotary_emb(hidden, position_ids)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    weights = weights + causal_additive_mask(length, weights.dtype, weights.device)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(1, length, -1)
    hidden = residual + attn.o_proj(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, weights


# Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaAttention.forward and
# eager_attention_forward: the attention map only
@copied_from("transformers.models.llama.modeling_llama.LlamaAttention.forward", sha="32a79445373f688d", version="5.25.0")
@copied_from("transformers.models.llama.modeling_llama.eager_attention_forward", sha="ca07257165d5e0f8", version="5.25.0")
def query_key_attention(model, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The attention map (1, H, N, N) layer ``layer_index`` computes on ``hidden`` (1, N, C), eagerly, from
    its input norm, q and k projections and RoPE (PyramidDrop re-projects the hidden states entering its
    ranking layer this way)."""
    layer = model.layers[layer_index]
    attn = layer.self_attn
    length = hidden.shape[1]
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.rotary_emb(hidden, position_ids)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    weights = weights + causal_additive_mask(length, weights.dtype, weights.device)
    return torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
