"""A faithful re-enactment of the official VisionZip and VisPruner code paths.

The official code asks the whole tower for ``output_attentions=True`` (eager attention in every layer,
every attention map kept), reads ``attentions[-2]`` / ``hidden_states[-2]`` and merges contextual tokens
with a dense one-hot matrix product. This module does the same, on current transformers, so that

- the benchmark can measure our lean path against it in the same run, and
- tests can check our implementation on cases beyond the recorded fixtures (other seeds, budgets,
  batch sizes).

Not for production use: it is slow and memory-hungry on purpose.
"""
from __future__ import annotations

import torch

from .encoders import attention_implementation, encoder_adapter


def official_forward(vision_model, pixel_values: torch.Tensor, select_layer: int = -2):
    """Eager tower with all attentions and hidden states: (hidden (B, N, C), attention (B, H, N, N),
    keys averaged over heads (B, N, d)) of the selected layer."""
    adapter = encoder_adapter(vision_model)
    index = adapter.layer_index(select_layer)
    captured = {}

    def grab_keys(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        bsz, n, _ = x.shape
        k = module.k_proj(x).view(bsz, n, module.num_heads, module.head_dim)
        captured["metric"] = k.mean(dim=2)

    handle = adapter.layers[index].self_attn.register_forward_pre_hook(grab_keys, with_kwargs=True)
    try:
        with attention_implementation(vision_model, "eager"):
            dtype = next(vision_model.parameters()).dtype
            out = vision_model(pixel_values.to(dtype), output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    return out.hidden_states[select_layer], out.attentions[index], captured["metric"]


def official_visionzip(vision_model, pixel_values: torch.Tensor, dominant: int, contextual: int, select_layer: int = -2):
    """Official VisionZip (CLS encoders): returns (tokens (B, D + C, C), keep indices (B, D) in the
    official order: CLS first, then top patches by descending score)."""
    hidden, attn, metric = official_forward(vision_model, pixel_values, select_layer)
    bsz, n, channels = hidden.shape
    scores = attn[:, :, 0, 1:].sum(dim=1)
    top = scores.topk(dominant - 1, dim=1).indices + 1
    keep = torch.cat([torch.zeros(bsz, 1, dtype=top.dtype, device=top.device), top], dim=1)
    mask = torch.ones(bsz, n, dtype=torch.bool, device=hidden.device).scatter_(1, keep, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(bsz, dominant, channels)
    rest = n - dominant
    metric_rest = metric[mask].view(bsz, rest, metric.shape[-1])
    hidden_rest = hidden.masked_select(mask.unsqueeze(-1)).view(bsz, rest, channels)
    normed = metric_rest / metric_rest.norm(dim=-1, keepdim=True)
    step = max(1, rest // contextual)
    targets = torch.arange(0, rest, step, device=hidden.device)[:contextual]
    others = ~torch.isin(torch.arange(rest, device=hidden.device), targets)
    similarity = torch.bmm(normed[:, others], normed[:, targets].transpose(1, 2))
    one_hot = torch.zeros(bsz, int(others.sum()), contextual, dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    merged = torch.bmm(one_hot.transpose(1, 2), hidden_rest[:, others]) / counts
    contextual_tokens = hidden_rest[:, targets] + merged
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), keep


def official_vispruner_selection(scores: torch.Tensor, features: torch.Tensor, num_tokens: int,
                                 important_ratio: float = 0.5) -> torch.Tensor:
    """The official selection on given inputs: scores (B, P) (CLS attention, mean over heads), features
    (B, P, C) (layer -2 patch features) -> the (B, P) keep mask (Theia-4869/VisPruner at aefa01a,
    ``llava/model/llava_arch.py`` ``encode_images``)."""
    bsz, num_patches, _ = features.shape
    num_important = int(num_tokens * important_ratio)
    num_diverse = num_tokens - num_important
    order = scores.argsort(dim=-1, descending=True)
    important, residual = order[:, :num_important], order[:, num_important:]
    normed = features / features.norm(dim=-1, keepdim=True)
    batch = torch.arange(bsz, device=features.device).unsqueeze(-1)
    while True:
        remaining = residual.shape[1]
        drop = min(8, remaining - num_diverse)
        if drop <= 0:
            break
        tokens = normed[batch.expand(-1, remaining), residual]
        duplication = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(dim=-1).values
        survivors = duplication.argsort(dim=-1, descending=True)[:, drop:]
        residual = torch.cat([residual[:, ::2].gather(1, survivors), residual[:, 1::2]], dim=-1)
    selected = torch.cat([important, residual], dim=-1) if num_diverse > 0 else important
    return torch.zeros(bsz, num_patches, dtype=torch.bool, device=features.device).scatter_(1, selected, True)


def official_vispruner(vision_model, pixel_values: torch.Tensor, num_tokens: int, important_ratio: float = 0.5,
                       select_layer: int = -2, return_tokens: bool = False) -> torch.Tensor:
    """Official VisPruner: eager tower with all attentions, then the selection. Returns the (B, P) keep
    mask over patch tokens (``return_tokens``: the (B, T, C) kept patch features in sequence order, what
    the official code hands to the projector)."""
    hidden, attn, _ = official_forward(vision_model, pixel_values, select_layer)
    features = hidden[:, 1:]
    mask = official_vispruner_selection(attn[:, :, 0, 1:].mean(dim=1), features, num_tokens, important_ratio)
    if return_tokens:
        return features[mask].view(features.shape[0], num_tokens, features.shape[-1])
    return mask
