"""CogVLM's token-type rules and small tensor helpers, shared by the model (``modeling``) and its pruned
decoder loop (``pruning``). Shapes: B batch, L sequence, C hidden."""
from __future__ import annotations

import torch

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token types -> (B, L) bool: the tokens the vision expert computes (official
    ``get_expert_mask``: an image token followed by an image token; the last image token, eoi, is not)."""
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return mask


def cogvlm_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) token types (+ (B, L) real-token mask) -> (B, L) positions: the official
    ``build_position_ids`` numbering (boi / eoi advance, the first patch advances, the other patches share
    its position), counted per sample from its first real token (0), whatever the padding. Pads do not
    advance the count (they are masked out)."""
    types = token_type_ids.clone()
    real = torch.ones_like(types, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    types[~real] = -1
    prev = torch.full_like(types[:, :1], -1)
    nxt = torch.full_like(types[:, :1], -1)
    before = torch.cat([prev, types[:, :-1]], dim=1)
    after = torch.cat([types[:, 1:], nxt], dim=1)
    vision = types == VISION_TOKEN_TYPE
    # boi: an image token after a non-image token; eoi: an image token before a non-image token
    boi_eoi = vision & ((before != VISION_TOKEN_TYPE) | (after != VISION_TOKEN_TYPE))
    as_text = (types == LANGUAGE_TOKEN_TYPE) | boi_eoi
    before_as_text = torch.cat([torch.zeros_like(as_text[:, :1]), as_text[:, :-1]], dim=1)
    advance = as_text | (vision & before_as_text)
    # the first real token of a sample is position 0
    before_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    advance = advance & before_real
    return advance.long().cumsum(dim=-1)


def route(x: torch.Tensor, vision: torch.Tensor, vision_fn, language_fn, out_features: int) -> torch.Tensor:
    """Each token through its expert: x (B, L, C), vision (B, L) bool -> (B, L, out_features). Only the
    rows of each expert are computed (the image tokens are most of a prefill's rows)."""
    out = x.new_empty(*x.shape[:-1], out_features)
    if bool(vision.any()):
        out[vision] = vision_fn(x[vision])
        language = ~vision
        out[language] = language_fn(x[language])
    else:
        out = language_fn(x)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_bias(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor | None:
    """(B, K) real keys (the cache's and the new tokens') -> (B, 1, q_len, K) bool for SDPA, or None when
    every key is real (plain causal attention). A query always sees itself, so a pad's row is never empty
    (an all-masked row would be NaN, and a NaN value leaks through a zero weight)."""
    if bool(attention_mask.all()):
        return None
    kv_len = attention_mask.shape[1]
    past = kv_len - q_len
    query = torch.arange(q_len, device=attention_mask.device).unsqueeze(1) + past
    key = torch.arange(kv_len, device=attention_mask.device).unsqueeze(0)
    allowed = (key <= query) & attention_mask.bool()[:, None, :]
    allowed = allowed | (key == query)
    return allowed.unsqueeze(1)
