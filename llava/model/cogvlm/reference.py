"""A re-enactment of the official CogVLM forward (THUDM/cogvlm-chat-hf remote code), for the tests.

It runs the remote code's computation step by step on a ``CogVLMForCausalLM``'s weights, with the
official input layout (``build_conversation_input_ids``: bos, then ``vision_token_num`` pad ids typed
VISION_TOKEN_TYPE, then the prompt text), so that the native model can be held to it. Sources (the remote
code itself is not in a git repository; these carry it unchanged in the parts used here):

- huggingface/transformers at 92657d1814440a90e0414544e1587471e8df85c2,
  ``src/transformers/models/cogvlm/modeling_cogvlm.py``: ``CogVLMVisionModel`` (tower, GLU, boi / eoi),
  ``get_expert_mask``, ``CogVLMVisionExpertMLP`` / ``CogVLMVisionExpertAttention`` (expert routing by
  boolean index), ``build_position_ids``, ``attention_fn``;
- huggingface/transformers at 79cd06cbb16b7aa690f4049f5e3fe8f1a25febfc,
  ``src/transformers/models/cogvlm/util.py`` (the remote ``util.py``): ``FastRotaryEmbedding``, a triton
  kernel applying rotate-half RoPE (o0 = x0 cos - x1 sin, o1 = x0 sin + x1 cos on the two halves) with a
  cos / sin table looked up by ``position_ids``; re-enacted in torch;
- mindspore-lab/mindnlp at 30029a344e0668f16a18cf4026c691156c1d7675,
  ``mindnlp/transformers/models/cogvlm/modeling_cogvlm.py`` (a port of the remote file): the model forward
  (``index_put`` of the image features at the VISION positions, ``build_position_ids(token_type_ids,
  attention_mask)``, ``_prepare_decoder_attention_mask``), ``_history_to_prompt`` and
  ``build_conversation_input_ids``.

The tower's attention is the remote code's xformers ``memory_efficient_attention(q, k, v, scale)``,
re-enacted as the plain softmax it computes. The LLM's ``attention_fn`` runs SDPA when the mask is plain
causal (or full) and the eager softmax with the additive mask otherwise, as the official code does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def official_prompt(query: str, history=(), template_version: str = "chat") -> str:
    """``_history_to_prompt``: "Question: {q} Answer:" (chat), "... Short answer:" (vqa), the query (base)."""
    if template_version == "base":
        return query
    answer_format = {"vqa": "Short answer:", "chat": "Answer:"}[template_version]
    prompt = ""
    for old_query, response in history:
        prompt += "Question: " + old_query + " {} ".format(answer_format) + response + "\n"
    prompt += "Question: {} {}".format(query, answer_format)
    return prompt


def official_input_ids(tokenizer, config, query: str, with_image: bool = True, template_version: str | None = None,
                       vision_token_num: int | None = None):
    """``build_conversation_input_ids`` (the token part): (input_ids, token_type_ids, attention_mask), (L,).
    ``vision_token_num``: None = the official (patches + 2); another count lays out a compressed image."""
    vision = config.vision_config
    text = official_prompt(query, (), template_version or config.template_version)
    input_ids = [tokenizer.bos_token_id]
    token_type_ids = [LANGUAGE_TOKEN_TYPE]
    if with_image:
        if vision_token_num is None:
            vision_token_num = (vision["image_size"] // vision["patch_size"]) ** 2 + 2
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids += [pad] * vision_token_num
        token_type_ids += [VISION_TOKEN_TYPE] * vision_token_num
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    input_ids += text_ids
    token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
    ones = [1] * len(input_ids)
    return (torch.tensor(input_ids, dtype=torch.long), torch.tensor(token_type_ids, dtype=torch.long),
            torch.tensor(ones, dtype=torch.long))


def get_expert_mask(token_type_ids):
    vision_token_mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision_token_mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return vision_token_mask, ~vision_token_mask


def build_position_ids(x, attention_mask=None):
    if attention_mask is not None:
        tmp = x.clone()
        tmp[~(attention_mask.bool())] = -1
    else:
        tmp = x.clone()
    is_boi_eoi = torch.zeros_like(x, dtype=torch.bool)
    is_boi_eoi[:, 1:] |= (tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE)
    is_boi_eoi[:, 0] |= tmp[:, 0] == VISION_TOKEN_TYPE
    is_boi_eoi[:, :-1] |= (tmp[:, :-1] == VISION_TOKEN_TYPE) & (tmp[:, 1:] == LANGUAGE_TOKEN_TYPE)
    is_boi_eoi[:, -1] |= tmp[:, -1] == VISION_TOKEN_TYPE
    tmp[is_boi_eoi] = LANGUAGE_TOKEN_TYPE
    y = torch.zeros_like(x, dtype=torch.long)
    y[:, 1:] = (tmp[:, 1:] == LANGUAGE_TOKEN_TYPE) | ((tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE))
    return y.cumsum(dim=-1)


def official_tower(vision, images: torch.Tensor):
    """The remote tower (patch embedding, every layer) on (B, 3, S, S), the attention as the plain
    softmax(q k^T * scale) v that xformers computes. Returns the last layer's output (B, 1 + P, C), its
    attention probabilities (B, H, N, N) and its keys averaged over heads (B, N, d): what the official
    VisionZip / VisPruner code reads from a tower run with ``output_attentions``."""
    x = vision.patch_embedding.proj(images).flatten(2).transpose(1, 2)
    cls = vision.patch_embedding.cls_embedding.expand(x.shape[0], -1, -1)
    x = torch.cat((cls, x), dim=1)
    x = x + vision.patch_embedding.position_embedding.weight.unsqueeze(0)
    probs = keys = None
    for layer in vision.transformer.layers:
        attn = layer.attention
        bsz, n, _ = x.shape
        qkv = attn.query_key_value(x).reshape(bsz, n, 3, attn.num_heads, -1).permute(2, 0, 1, 3, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B, L, H, D
        keys = k.mean(dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        out = (probs @ v).transpose(1, 2)
        attention_output = layer.input_layernorm(attn.dense(out.reshape(bsz, n, -1)))
        x = x + attention_output
        mlp = layer.mlp
        x = x + layer.post_attention_layernorm(mlp.fc2(mlp.activation_fn(mlp.fc1(x))))
    return x, probs, keys


def official_adapter(vision, tokens: torch.Tensor) -> torch.Tensor:
    """The remote GLU on (B, T, C) tower tokens, framed by boi / eoi -> (B, T + 2, hidden)."""
    glu = vision.linear_proj
    x = glu.linear_proj(tokens)
    x = glu.act1(glu.norm1(x))
    x = F.silu(glu.gate_proj(x)) * glu.dense_h_to_4h(x)
    x = glu.dense_4h_to_h(x)
    boi = vision.boi.expand(x.shape[0], -1, -1)
    eoi = vision.eoi.expand(x.shape[0], -1, -1)
    return torch.cat((boi, x, eoi), dim=1)


def official_vision(vision, images: torch.Tensor) -> torch.Tensor:
    """``EVA2CLIPModel.forward``: (B, 3, S, S) -> (B, P + 2, hidden)."""
    return official_adapter(vision, official_tower(vision, images)[0][:, 1:])


def defined_vispruner(vision, images: torch.Tensor, tokens: int, important_ratio: float = 0.5) -> torch.Tensor:
    """VisPruner on CogVLM by its definition (the VisPruner paper, section 5.5: "CogVLM [uses an MLP] as
    projector, so we apply VisPruner in the same manner as with LLaVA"): the official selection
    (``visionzip.reference.official_vispruner_selection``) on the CLS attention (mean over heads) and the
    patch features of the layer CogVLM reads (its last), the kept patches in sequence order through the
    adapter -> (B, tokens + 2, hidden). No official CogVLM code exists for it."""
    from visionzip.reference import official_vispruner_selection

    hidden, probs, _ = official_tower(vision, images)
    features = hidden[:, 1:]
    mask = official_vispruner_selection(probs[:, :, 0, 1:].mean(dim=1), features, tokens, important_ratio)
    return official_adapter(vision, features[mask].view(features.shape[0], tokens, features.shape[-1]))


def defined_visionzip(vision, images: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip on CogVLM by its definition: the official VisionZip steps (dvlab-research/VisionZip at
    3151f6d, ``visionzip/clip_encoder.py``, as ``visionzip.reference.official_visionzip`` re-enacts them:
    CLS + top patches by CLS attention summed over heads, contextual tokens merged by head-averaged keys)
    on the layer CogVLM reads, the CLS kept as VisionZip keeps it, then the adapter -> (B, D + C + 2, hidden)."""
    hidden, probs, metric = official_tower(vision, images)
    bsz, n, channels = hidden.shape
    scores = probs[:, :, 0, 1:].sum(dim=1)
    top = scores.topk(dominant - 1, dim=1).indices + 1
    keep = torch.cat([torch.zeros(bsz, 1, dtype=top.dtype), top], dim=1)
    mask = torch.ones(bsz, n, dtype=torch.bool).scatter_(1, keep, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(bsz, dominant, channels)
    rest = n - dominant
    metric_rest = metric[mask].view(bsz, rest, metric.shape[-1])
    hidden_rest = hidden.masked_select(mask.unsqueeze(-1)).view(bsz, rest, channels)
    normed = metric_rest / metric_rest.norm(dim=-1, keepdim=True)
    step = max(1, rest // contextual)
    targets = torch.arange(0, rest, step)[:contextual]
    others = ~torch.isin(torch.arange(rest), targets)
    similarity = torch.bmm(normed[:, others], normed[:, targets].transpose(1, 2))
    one_hot = torch.zeros(bsz, int(others.sum()), contextual, dtype=hidden.dtype)
    one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    merged = torch.bmm(one_hot.transpose(1, 2), hidden_rest[:, others]) / counts
    contextual_tokens = hidden_rest[:, targets] + merged
    return official_adapter(vision, torch.cat([dominant_tokens, contextual_tokens], dim=1))


def _rms(norm, x):
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return (norm.weight * x).to(dtype)


def _fast_rotary(inv_freq, q, k, position_ids, max_seqlen):
    """``FastRotaryEmbedding(pos_idx_in_fp32=False)`` re-enacted: the cos / sin table over
    ``arange(max_seqlen)`` in ``inv_freq``'s dtype, looked up by position, applied to the two halves."""
    t = torch.arange(max_seqlen, device=q.device, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    cos_table, sin_table = torch.cos(freqs).to(q.dtype), torch.sin(freqs).to(q.dtype)
    cos = F.embedding(position_ids, cos_table).unsqueeze(1)  # B, 1, L, d/2
    sin = F.embedding(position_ids, sin_table).unsqueeze(1)

    def apply(x):
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)

    return apply(q), apply(k)


def _decoder_mask(attention_mask, dtype):
    """``_prepare_decoder_attention_mask`` (no past): causal + padding, additive with finfo.min."""
    bsz, tgt_len = attention_mask.shape
    mask = torch.full((tgt_len, tgt_len), torch.finfo(dtype).min)
    cond = torch.arange(tgt_len)
    mask.masked_fill_(cond < (cond + 1).view(tgt_len, 1), 0)
    causal = mask.to(dtype)[None, None].expand(bsz, 1, tgt_len, tgt_len)
    expanded = attention_mask[:, None, None, :].expand(bsz, 1, tgt_len, tgt_len).to(dtype)
    inverted = 1.0 - expanded
    inverted = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)
    return inverted + causal


def _attention_fn(q, k, v, attention_mask):
    attention_mask_bool = attention_mask == 0
    is_low_triangle = (attention_mask_bool == torch.ones_like(attention_mask_bool, dtype=torch.float).tril()).all()
    is_full = (attention_mask_bool > 0).all()
    if is_full or is_low_triangle:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=not is_full)
    q = q / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) + attention_mask
    scores = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(scores, v)


def _expert(x, vision_mask, language_mask, vision_fn, language_fn, out_features):
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    out[vision_mask] = vision_fn(x[vision_mask])
    out[language_mask] = language_fn(x[language_mask])
    return out


@torch.no_grad()
def official_logits(model, input_ids, token_type_ids, attention_mask, images=None, image_features=None) -> torch.Tensor:
    """The official ``CogVLMForCausalLM.forward`` (no past) -> logits (B, L, vocab) float32.

    input_ids / token_type_ids / attention_mask: (B, L) in the official layout (``official_input_ids``);
    images: (B, 3, S, S) with one image per sample, or None. ``image_features`` (B, T, hidden): put these at
    the VISION positions instead of the tower's (a compressed image: ``vision_token_num`` = T in the
    official layout, everything else as the official code does it)."""
    core = model.model
    config = model.config
    inputs_embeds = core.embed_tokens(input_ids)
    if images is not None or image_features is not None:
        features = official_vision(core.vision, images.to(inputs_embeds.dtype)) if image_features is None else image_features
        features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.index_put([token_type_ids == VISION_TOKEN_TYPE], features)
    position_ids = build_position_ids(token_type_ids, attention_mask)
    mask = _decoder_mask(attention_mask, inputs_embeds.dtype)
    hidden = inputs_embeds
    bsz, q_len, size = hidden.shape
    heads = config.num_attention_heads
    for layer in core.layers:
        residual = hidden
        h = _rms(layer.input_layernorm, hidden)
        attn = layer.self_attn
        vision_mask, language_mask = get_expert_mask(token_type_ids)
        mixed = _expert(h, vision_mask, language_mask, attn.vision_expert_query_key_value,
                        attn.language_expert_query_key_value, size * 3)
        q, k, v = (t.view(bsz, q_len, heads, size // heads).permute(0, 2, 1, 3) for t in torch.split(mixed, size, dim=-1))
        q, k = _fast_rotary(attn.rotary_emb.inv_freq, q, k, position_ids, int(position_ids.max()) + 1)
        context = _attention_fn(q, k, v, mask)
        context = context.transpose(1, 2).contiguous().reshape(bsz, q_len, size)
        h = _expert(context, vision_mask, language_mask, attn.vision_expert_dense, attn.language_expert_dense, size)
        hidden = residual + h
        residual = hidden
        h = _rms(layer.post_attention_layernorm, hidden)
        h = _expert(h, vision_mask, language_mask, layer.mlp.vision_mlp, layer.mlp.language_mlp, size)
        hidden = residual + h
    hidden = _rms(core.norm, hidden)
    return model.lm_head(hidden).float()
