"""The projector from vision features (``mm_hidden_size``) to the language model's embeddings."""
from __future__ import annotations

import re

from torch import nn

MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


class IdentityMap(nn.Module):
    """No projection (the vision features already have the language model's width)."""

    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self) -> dict:
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, delay_load: bool = False, **kwargs) -> nn.Module:
    """``mm_projector_type``: "linear", "mlp{N}x_gelu" (N linear layers with GELU between) or "identity".

    Parameter names follow the original (``mm_projector.{0,2}.weight`` for mlp2x_gelu).
    """
    projector_type = getattr(config, "mm_projector_type", "linear")
    mm_hidden, hidden = int(config.mm_hidden_size), int(config.hidden_size)
    if projector_type == "linear":
        return nn.Linear(mm_hidden, hidden)
    match = MLP_GELU.match(projector_type)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"mm_projector_type {projector_type!r} needs at least one layer")
        layers: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        if mm_hidden != hidden:
            raise ValueError(
                f"mm_projector_type 'identity' needs mm_hidden_size == hidden_size, got {mm_hidden} and {hidden}"
            )
        return IdentityMap()
    raise ValueError(f"unknown mm_projector_type {projector_type!r}; use 'linear', 'mlpNx_gelu' or 'identity'")
