"""Random token selection: a uniform random subset of the patches of each view, seeded.

The sanity baseline of token-reduction tables (no official code: the rule is this docstring). Each view
keeps ``tokens`` of its patch tokens (the CLS token is never kept, as LLaVA's "patch" features), drawn
uniformly without replacement and emitted in sequence order, from the selected layer's output.

Determinism: view ``b`` of a call draws with a ``torch.Generator`` (CPU) seeded with ``seed + b``: the
same seed and batch index always give the same subset, whatever the device. So a batch is not the same
as its views one by one with the same seed: view ``b`` alone matches it with ``seed + b`` (tests check
exactly this). The draw is ``randperm(num_patches)[:tokens]``, sorted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..encoders import EncoderCapture, VisionEncoderAdapter
from .base import CompressedTokens, CompressionMethod, check_count, gather_tokens, register_method

# torch.Generator.manual_seed takes seeds below 2**64; view b draws with seed + b, so a seed is at most
# 2**63 - 1 (room for any batch), refused beyond when the spec is parsed rather than at the first image
MAX_SEED = 2**63 - 1


def random_keep_indices(batch: int, num_patches: int, tokens: int, seed: int, device=None) -> torch.Tensor:
    """(batch, tokens) patch indices (0-based among patches), ascending; row b drawn with seed + b."""
    rows = []
    for view in range(batch):
        generator = torch.Generator().manual_seed(seed + view)
        rows.append(torch.randperm(num_patches, generator=generator)[:tokens].sort().values)
    return torch.stack(rows).to(device)


def check_random_budget(adapter: VisionEncoderAdapter, tokens, select_layer: int) -> int:
    tokens = check_count("tokens", tokens)
    adapter.layer_index(select_layer)
    if tokens > adapter.num_patches:
        raise ValueError(f"random: tokens = {tokens} exceeds the {adapter.num_patches} patch tokens of layer {select_layer}")
    return tokens


def reference_random(hidden: torch.Tensor, tokens: int, seed: int = 0, has_cls: bool = True):
    """The rule above, done plainly on the selected layer's output hidden (B, N, C) (the tower's
    ``hidden_states[select_layer]``): per view a seeded ``randperm``. Returns (tokens (B, T, C), kept
    patch indices (B, T))."""
    patches = hidden[:, int(has_cls) :]
    out, kept = [], []
    for view in range(hidden.shape[0]):
        generator = torch.Generator().manual_seed(seed + view)
        keep = torch.randperm(patches.shape[1], generator=generator)[:tokens].sort().values
        out.append(patches[view, keep])
        kept.append(keep)
    return torch.stack(out), torch.stack(kept)


@register_method
@dataclass
class RandomTokens(CompressionMethod):
    """random: ``tokens`` patches per view drawn uniformly (seeded), in sequence order."""

    name: ClassVar[str] = "random"
    stage: ClassVar[str] = "encoder_output"
    summary: ClassVar[str] = "a uniform random subset of the patches, seeded"
    reference: ClassVar[str] = "visionzip.methods.random_tokens.reference_random"
    needs_attention_input: ClassVar[bool] = False

    tokens: int = 64
    seed: int = 0

    def validate(self):
        self.tokens = check_count("tokens", self.tokens)
        self.seed = check_count("seed", self.seed, minimum=0)
        if self.seed > MAX_SEED:
            raise ValueError(f"random: seed must be <= {MAX_SEED} (2**63 - 1), got {self.seed}")
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> RandomTokens:
        return cls(tokens=check_count("visual tokens", tokens))

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.tokens

    def label(self) -> str:
        return f"random {self.tokens}"

    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        check_random_budget(adapter, self.tokens, select_layer)

    def compress(self, adapter: VisionEncoderAdapter, capture: EncoderCapture) -> CompressedTokens:
        offset = int(adapter.has_cls)
        patches = capture.hidden[:, offset:]
        keep = random_keep_indices(patches.shape[0], patches.shape[1], self.tokens, self.seed, patches.device)
        return CompressedTokens(gather_tokens(patches, keep), keep + offset, adapter.has_cls, cls_kept=False)

    def encode(self, adapter, pixel_values, select_layer: int = -2, early_exit: bool = True) -> CompressedTokens:
        check_random_budget(adapter, self.tokens, select_layer)
        return super().encode(adapter, pixel_values, select_layer, early_exit)
