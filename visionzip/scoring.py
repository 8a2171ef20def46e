"""Token importance from one encoder layer's attention, computed from its queries and keys.

Only the rows that are needed are computed: for a CLS encoder the CLS query row, (B, H, 1, N) instead
of the full (B, H, N, N) map; for encoders without CLS the received attention is accumulated over
query chunks so that no full map is held at once.
"""
from __future__ import annotations

import torch


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of the CLS query over all keys.

    q_cls: (B, H, 1, d), k: (B, H, N, d) -> (B, H, N) float32 (softmax over the N keys, CLS included).
    """
    logits = torch.matmul(q_cls * scale, k.transpose(-1, -2)).squeeze(-2)
    return torch.softmax(logits.float(), dim=-1)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk_size: int = 256) -> torch.Tensor:
    """Mean attention each token receives: average over heads, then over queries (VisionZip A.2).

    q: (B, H, N, d), k: (B, H, N, d) -> (B, N) float32. Accumulated over chunks of ``chunk_size`` queries.
    """
    bsz, heads, n, _ = q.shape
    total = torch.zeros(bsz, k.shape[2], dtype=torch.float32, device=q.device)
    keys_t = k.transpose(-1, -2)
    for start in range(0, n, chunk_size):
        logits = torch.matmul(q[:, :, start : start + chunk_size] * scale, keys_t)
        total += torch.softmax(logits.float(), dim=-1).sum(dim=(1, 2))
    return total / (heads * n)


def key_metric(k: torch.Tensor) -> torch.Tensor:
    """VisionZip's merging metric: the layer's keys averaged over heads. (B, H, N, d) -> (B, N, d)."""
    return k.mean(dim=1)
