"""The official Qwen-VL forward re-enacted, eager, on a state dict in the hub's layout (for the tests).

Not for production: it follows the remote code step by step (sequence-first tensors, eager softmax
attention, the masks and rotary tables built as there) so that the tests can hold ``QwenVLForCausalLM`` to it.
Sources (docs/qwen_vl.md): the hub's ``visual.py`` (wangjl1993/extract_human_attri@192fcbb
``Qwen-VL-Chat/visual.py``) and ``modeling_qwen.py`` (HyeonjeongHa/MM-PoisonRAG@ad21166
``Qwen-VL-Chat/modeling_qwen.py``): ``VisionTransformer.forward``, ``Resampler.forward`` (a real
``torch.nn.MultiheadAttention``, as there), ``VisualAttention.forward``, ``QWenModel.forward`` (image span
overwrite, ``_prepare_decoder_attention_mask``, dynamic NTK, ``RotaryEmbedding``), ``QWenAttention.forward``
and ``_attn`` (log-n, eager softmax), ``QWenMLP``, ``RMSNorm``, ``QWenLMHeadModel.forward``.

``official_vispruner_tokens`` is VisPruner on Qwen-VL by its definition (``llava.model.qwen_vl.compression``):
the encoder's last-block attention maps and the resampler's attention weights taken whole from the eager
official path, combined, then the official VisPruner selection (``visionzip.reference``). The VisPruner
repository (Theia-4869/VisPruner) has the LLaVA path only, so there is no official compressed Qwen-VL code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visionzip.reference import official_vispruner_selection

EPS = 1e-6


def _get_abs_pos(abs_pos, tgt_size):
    src_size = int(math.sqrt(abs_pos.size(0)))
    tgt_size = int(math.sqrt(tgt_size))
    if src_size != tgt_size:
        return F.interpolate(
            abs_pos.float().reshape(1, src_size, src_size, -1).permute(0, 3, 1, 2),
            size=(tgt_size, tgt_size), mode="bicubic", align_corners=False,
        ).permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)
    return abs_pos


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], EPS)


def _visual_attention(x, sd, prefix, heads, keep_probs=None):
    """Official ``VisualAttention.forward`` on (sq, b, h); ``keep_probs``: a list that receives the
    (b * heads, sq, sk) attention probabilities."""
    sq, b, width = x.shape
    head_dim = width // heads
    mixed = F.linear(x, sd[prefix + ".in_proj.weight"], sd[prefix + ".in_proj.bias"])
    mixed = mixed.view(sq, b, heads, 3 * head_dim)
    query, key, value = mixed.split(head_dim, dim=-1)
    query = query.reshape(sq, b * heads, head_dim).transpose(0, 1)
    key = key.reshape(sq, b * heads, head_dim).transpose(0, 1)
    q_scaled = query / math.sqrt(head_dim)
    probs = torch.bmm(q_scaled, key.transpose(-2, -1)).softmax(dim=-1)
    if keep_probs is not None:
        keep_probs.append(probs)
    value = value.reshape(sq, b * heads, head_dim).transpose(0, 1)
    context = torch.bmm(probs, value).view(b, heads, sq, head_dim).permute(2, 0, 1, 3).contiguous()
    context = context.view(sq, b, width)
    return F.linear(context, sd[prefix + ".out_proj.weight"], sd[prefix + ".out_proj.bias"])


def _resampler(x, sd, prefix, embed_dim, keep_weights=None):
    """Official ``Resampler.forward`` with a real ``nn.MultiheadAttention`` (``need_weights`` at its default)."""
    pos_embed_table = sd[prefix + ".pos_embed"]
    pos_embed = _get_abs_pos(pos_embed_table, x.size(1))
    if prefix + ".kv_proj.weight" in sd:
        x = F.linear(x, sd[prefix + ".kv_proj.weight"])
    x = F.layer_norm(x, x.shape[-1:], sd[prefix + ".ln_kv.weight"], sd[prefix + ".ln_kv.bias"], EPS).permute(1, 0, 2)
    n = x.shape[1]
    q = F.layer_norm(sd[prefix + ".query"], (embed_dim,), sd[prefix + ".ln_q.weight"], sd[prefix + ".ln_q.bias"], EPS)
    mha = nn.MultiheadAttention(embed_dim, embed_dim // 128).to(dtype=x.dtype)
    mha.load_state_dict({k[len(prefix + ".attn."):]: v for k, v in sd.items() if k.startswith(prefix + ".attn.")})
    mha.eval()
    out, weights = mha(q.unsqueeze(1).repeat(1, n, 1) + pos_embed_table.unsqueeze(1), x + pos_embed.unsqueeze(1), x)
    if keep_weights is not None:
        keep_weights.append(weights)
    return out.permute(1, 0, 2)


def official_visual(sd: dict, visual: dict, pixel_values: torch.Tensor, prefix: str = "transformer.visual",
                    trace: dict | None = None) -> torch.Tensor:
    """Official ``VisionTransformer.forward``: (B, 3, S, S) -> (B, 256, output_dim). ``trace``: a dict that
    receives ``outputs`` (the resampler outputs), ``last_probs`` (the last block's attention, (B * heads, P, P))
    and ``cross`` (the resampler's head-mean weights, (B, Q, P))."""
    weight = sd[prefix + ".conv1.weight"]
    x = F.conv2d(pixel_values.to(weight.dtype), weight, stride=int(visual["patch_size"]))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = x + _get_abs_pos(sd[prefix + ".positional_embedding"], x.size(1))
    x = _layer_norm(x, sd, prefix + ".ln_pre").permute(1, 0, 2)
    layers = int(visual["layers"])
    for i in range(layers):
        block = f"{prefix}.transformer.resblocks.{i}"
        keep = [] if (trace is not None and i == layers - 1) else None
        x = x + _visual_attention(_layer_norm(x, sd, block + ".ln_1"), sd, block + ".attn", int(visual["heads"]), keep)
        if keep is not None:
            trace["last_probs"] = keep[0]
        h = _layer_norm(x, sd, block + ".ln_2")
        h = F.gelu(F.linear(h, sd[block + ".mlp.c_fc.weight"], sd[block + ".mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[block + ".mlp.c_proj.weight"], sd[block + ".mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)
    weights = [] if trace is not None else None
    x = _resampler(x, sd, prefix + ".attn_pool", int(visual["output_dim"]), weights)
    if trace is not None:
        trace["outputs"], trace["cross"] = x, weights[0]
    x = _layer_norm(x, sd, prefix + ".ln_post")
    return x @ sd[prefix + ".proj"]


def official_query_scores(sd: dict, visual: dict, pixel_values: torch.Tensor, prefix: str = "transformer.visual"):
    """VisPruner's scoring inputs on Qwen-VL by its definition, from the eager official maps: (importance (B, Q):
    each query's head-mean resampler attention over the patches times the attention each patch receives in the
    last ViT block (mean over heads and rows), resampler outputs (B, Q, E))."""
    trace: dict = {}
    official_visual(sd, visual, pixel_values, prefix, trace)
    outputs = trace["outputs"]
    bsz, patches = outputs.shape[0], trace["cross"].shape[-1]
    probs = trace["last_probs"].view(bsz, int(visual["heads"]), patches, patches)
    patch_attention = probs.float().mean(dim=(1, 2))
    importance = torch.bmm(trace["cross"].float(), patch_attention.unsqueeze(-1)).squeeze(-1)
    return importance, outputs


def official_vispruner_tokens(sd: dict, visual: dict, pixel_values: torch.Tensor, num_tokens: int,
                              important_ratio: float = 0.5, prefix: str = "transformer.visual", scores=None) -> torch.Tensor:
    """VisPruner on Qwen-VL by its definition: (B, T, output_dim) the kept queries' LLM embeddings in query order.
    ``scores``: (importance, outputs) to select from (default: ``official_query_scores``): the selection's chain of
    argsorts turns last-bit differences of near-tied similarities into other choices, so a test of the selection
    itself gives it the scores of the path under test."""
    importance, outputs = official_query_scores(sd, visual, pixel_values, prefix) if scores is None else scores
    bsz = outputs.shape[0]
    mask = official_vispruner_selection(importance, outputs, num_tokens, important_ratio)
    kept = outputs[mask].view(bsz, num_tokens, outputs.shape[-1])
    return _layer_norm(kept, sd, prefix + ".ln_post") @ sd[prefix + ".proj"]


# ----- the language model --------------------------------------------------------------------------------
def _rms_norm(x, weight, eps):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def _rotate_half(x):
    x1, x2 = x.unflatten(-1, (2, -1)).unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_tables(dim, base, seqlen, ntk_alpha):
    """Official ``RotaryEmbedding.update_rotary_pos_emb_cache`` + ``forward(seqlen)``: [cos, sin] (1, seqlen, 1, dim)."""
    base = base * ntk_alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    cached = max(2 * seqlen, 16)
    freqs = torch.outer(torch.arange(cached).type_as(inv_freq), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    return [emb.cos()[:, :seqlen], emb.sin()[:, :seqlen]]


def _apply_rotary(t, freqs):
    cos, sin = freqs
    rot_dim = cos.shape[-1]
    t_, t_pass = t[..., :rot_dim].float(), t[..., rot_dim:].float()
    t_ = (t_ * cos) + (_rotate_half(t_) * sin)
    return torch.cat((t_, t_pass), dim=-1).type_as(t)


def official_logits(sd: dict, config, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Official ``QWenLMHeadModel.forward`` (prefill, no cache, eval): input_ids (B, L) in the official
    format (``<img>``, ``n_queries`` ids, ``</img>`` per image; images in order) -> logits (B, L, vocab)."""
    hidden_size, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden_size // heads
    bsz, length = input_ids.shape
    start_id = config.visual["image_start_id"]
    embeds = F.embedding(input_ids, sd["transformer.wte.weight"])
    dtype = embeds.dtype
    # _prepare_decoder_attention_mask: causal (finfo.min above the diagonal) + expanded padding mask
    mask = torch.full((length, length), torch.finfo(dtype).min)
    cond = torch.arange(length)
    mask.masked_fill_(cond < (cond + 1).view(length, 1), 0)
    mask = mask.to(dtype)[None, None].expand(bsz, 1, length, length)
    if attention_mask is not None:
        inverted = 1.0 - attention_mask[:, None, None, :].expand(bsz, 1, length, length).to(dtype)
        mask = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min) + mask
    # dynamic NTK at the prefill
    ntk_alpha = 1.0
    if config.use_dynamic_ntk:
        context_value = math.log(length / config.seq_length, 2) + 1
        ntk_alpha = max(2 ** math.ceil(context_value) - 1, 1)
    rotary = _rotary_tables(int(config.kv_channels * config.rotary_pct), config.rotary_emb_base, length, ntk_alpha)
    hidden = embeds.clone()
    if pixel_values is not None:
        images = official_visual(sd, config.visual, pixel_values)
        bos = torch.where(input_ids == start_id)
        eos = torch.where(input_ids == start_id + 1)
        for idx, (i, a, b) in enumerate(zip(bos[0].tolist(), bos[1].tolist(), eos[1].tolist())):
            hidden[i][a + 1 : b] = images[idx]
    logn_list = [math.log(i, config.seq_length) if i > config.seq_length else 1 for i in range(1, 32768)]
    logn = torch.tensor(logn_list)[None, :, None, None].type_as(hidden)
    for layer in range(config.num_hidden_layers):
        p = f"transformer.h.{layer}"
        x = _rms_norm(hidden, sd[p + ".ln_1.weight"], config.layer_norm_epsilon)
        mixed = F.linear(x, sd[p + ".attn.c_attn.weight"], sd[p + ".attn.c_attn.bias"])
        query, key, value = (t.view(bsz, length, heads, head_dim) for t in mixed.split(hidden_size, dim=2))
        freqs = [t[:, -length:] for t in rotary]
        query, key = _apply_rotary(query, freqs), _apply_rotary(key, freqs)
        if config.use_logn_attn:
            query = query * logn[:, 0:length].expand_as(query)
        query, key, value = query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3)
        weights = torch.matmul(query, key.transpose(-1, -2)) / torch.full([], value.size(-1) ** 0.5, dtype=dtype)
        weights = nn.functional.softmax(weights + mask, dim=-1).type(value.dtype)
        context = torch.matmul(weights, value).transpose(1, 2).contiguous().view(bsz, length, hidden_size)
        bias = sd.get(p + ".attn.c_proj.bias")
        hidden = hidden + F.linear(context, sd[p + ".attn.c_proj.weight"], bias)
        x = _rms_norm(hidden, sd[p + ".ln_2.weight"], config.layer_norm_epsilon)
        a1 = F.linear(x, sd[p + ".mlp.w1.weight"], sd.get(p + ".mlp.w1.bias"))
        a2 = F.linear(x, sd[p + ".mlp.w2.weight"], sd.get(p + ".mlp.w2.bias"))
        hidden = hidden + F.linear(a1 * F.silu(a2), sd[p + ".mlp.c_proj.weight"], sd.get(p + ".mlp.c_proj.bias"))
    hidden = _rms_norm(hidden, sd["transformer.ln_f.weight"], config.layer_norm_epsilon)
    return F.linear(hidden, sd["lm_head.weight"])
