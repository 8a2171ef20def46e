"""What every compression method returns, the registry of methods, and shared index helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import CompressionConfig
from ..encoders import EncoderCapture, VisionEncoderAdapter


@dataclass
class CompressedTokens:
    """Visual tokens that survive compression, still in the encoder's feature space (pre-projector).

    tokens: (B, T, C). Its first ``num_kept`` tokens are encoder tokens kept as they are, at the
        sequence positions ``keep_indices`` (B, num_kept), ascending (CLS = 0 first when kept); any
        tokens after them are merged (VisionZip's contextual tokens).
    has_cls: whether position 0 of the encoder sequence is a CLS token (patch p sits at p + has_cls).
    cls_kept: whether the CLS token is among the kept tokens (VisionZip keeps it, VisPruner does not).
    """

    tokens: torch.Tensor
    keep_indices: torch.Tensor
    has_cls: bool
    cls_kept: bool

    @property
    def num_kept(self) -> int:
        return self.keep_indices.shape[1]

    @property
    def num_merged(self) -> int:
        return self.tokens.shape[1] - self.num_kept


Compress = Callable[[VisionEncoderAdapter, EncoderCapture, CompressionConfig], CompressedTokens]
Check = Callable[[VisionEncoderAdapter, CompressionConfig, int], None]


@dataclass(frozen=True)
class Method:
    """A registered method: ``check`` validates a budget against an encoder before anything runs
    (a ValueError naming the value and the limit); ``compress`` works on a captured encoder pass."""

    name: str
    compress: Compress
    check: Check


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, check: Check) -> Callable[[Compress], Compress]:
    def add(fn: Compress) -> Compress:
        _REGISTRY[name] = Method(name, fn, check)
        return fn

    return add


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown compression method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


def complement_indices(keep: torch.Tensor, length: int) -> torch.Tensor:
    """Positions of 0..length-1 not in ``keep``, ascending, without a host sync.

    keep: (B, K) distinct positions -> (B, length - K).
    """
    mask = torch.zeros(keep.shape[0], length, dtype=torch.uint8, device=keep.device)
    mask.scatter_(1, keep, 1)
    # a stable sort puts the unkept (0) positions first, in ascending order
    order = torch.sort(mask, dim=1, stable=True).indices
    return order[:, : length - keep.shape[1]]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C), index: (B, K) -> (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
