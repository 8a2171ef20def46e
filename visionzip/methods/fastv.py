"""FastV (Chen et al., ECCV 2024): inside the LLM, after layer K-1, keep the R visual tokens the last token
attends to most (layer K-1's attention, averaged over heads); layers K.. and their KV cache see only the
kept visual tokens and all text tokens.

Official code: pkunlp-icler/FastV at d165972, ``src/transformers/src/transformers/models/llama/modeling_llama.py``
(``LlamaModel.forward``, the ``fast_v_inplace`` branch; its fork of transformers 4.31). What it does, and
what we do instead:

- It asks every layer for eager attention maps and reads layer K-1's; we compute only the last token's
  row of layer K-1's attention from that layer's q and k (RoPE, causal and padding mask), SDPA elsewhere.
- It ranks a hard-coded span ``[fast_v_sys_length, fast_v_sys_length + 576)`` (the lmms-eval variant:
  35..611); we rank the visual positions the splice marks (any image position, LLaVA-NeXT's longer and
  per-image different spans, several images).
- It reads batch index 0 only (``torch.mean(attn, dim=1)[0]``) and has no padding; each sample here gets
  its own selection, samples are re-padded on the left when their kept counts differ.
- Its inplace path has no KV cache (``fastv_kvcache.py`` does the selection once in prefill, batch 0
  only, and appends layer K-1's cache twice); we prune once in prefill and decode on the pruned cache:
  layers < K keep the whole prefix, layers >= K the kept tokens, with their original positions (the
  fork's ``seq_len=1000`` rotary patch exists for the same reason).
- R is absolute (of 576); we keep ``tokens`` per view: a sample with V visual tokens keeps
  ``V * tokens // view_tokens`` (exactly ``tokens`` on LLaVA-1.5; on LLaVA-NeXT the same share of its
  views' tokens, image newlines included, as VisionZip counts 5 x 32 = 160 tokens per image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..eager_llama import eager_layer
from ..llm import PruningContext, check_pruner_layers, top_visual
from .base import CompressionMethod, check_count, register_method

DEFAULT_VIEW_TOKENS = 576  # CLIP ViT-L/14-336 patches per view (LLaVA-1.5 / NeXT)


def visual_keep_counts(visual_counts: torch.Tensor, tokens: int, view_tokens: int | None) -> torch.Tensor:
    """Visual tokens each sample keeps: ``tokens`` per ``view_tokens`` of its visual tokens (all of them
    when it has fewer). visual_counts: (B,) long -> (B,) long. ``view_tokens`` None: ``tokens`` absolute."""
    if view_tokens is None:
        keep = torch.full_like(visual_counts, tokens)
    else:
        keep = visual_counts * tokens // view_tokens
    return torch.minimum(keep, visual_counts)


@dataclass
class OneDropPruner:
    """The fields of an ``LLMTokenPruner`` that drops once, before layer ``layer``, scored by layer
    ``layer - 1``, keeping ``tokens`` per ``view_tokens`` visual tokens (FastV, DART)."""

    layer: int
    tokens: int
    view_tokens: int | None = DEFAULT_VIEW_TOKENS
    keep_original_positions: bool = True

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def score_layer(self, layer: int) -> int:
        return layer - 1


@dataclass
class FastVPruner(OneDropPruner):
    """The ``LLMTokenPruner`` of FastV: the last query's attention, averaged over heads, ranks the visual tokens."""

    def select(self, context: PruningContext) -> torch.Tensor:
        rows = context.attention_rows(context.last_query_index())  # (B, H, 1, N)
        scores = rows.mean(dim=1)[:, 0]  # (B, N)
        counts = visual_keep_counts(context.visual_mask.sum(dim=1), self.tokens, self.view_tokens)
        return top_visual(scores, context.visual_mask, counts) | (context.valid_mask & ~context.visual_mask)


@register_method
@dataclass
class FastV(CompressionMethod):
    """FastV: ``tokens`` (R) visual tokens per view survive from LLM layer ``layer`` (K) on, chosen by the
    attention the last token gives them in layer K-1."""

    name: ClassVar[str] = "fastv"
    stage: ClassVar[str] = "llm"
    summary: ClassVar[str] = "in the LLM: keep the visual tokens the last token attends to most at layer K-1"
    positional: ClassVar[tuple[str, ...]] = ("tokens", "layer")
    reference: ClassVar[str] = "visionzip.methods.fastv.official_fastv"
    needs_attention_input: ClassVar[bool] = False

    tokens: int = 64
    layer: int = 2

    def validate(self):
        self.tokens = check_count("tokens", self.tokens)
        self.layer = check_count("layer", self.layer, minimum=1)
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> FastV:
        """The papers' FastV rows (VisionZip Table 1, VisPruner Tables 1-2, 5-8): K = 2, R = the budget."""
        return cls(tokens=check_count("visual tokens", tokens), layer=2)

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.tokens if num_tokens is None else min(self.tokens, num_tokens)

    def label(self) -> str:
        return f"fastv {self.tokens} K={self.layer}"

    def check_view(self, num_tokens: int) -> None:
        if self.tokens > num_tokens:
            raise ValueError(f"fastv keeps tokens = {self.tokens} per view, more than the {num_tokens} visual tokens of a view")

    def check_llm(self, num_layers: int) -> None:
        check_count("num_layers", num_layers)
        check_pruner_layers("fastv", (self.layer,), num_layers)

    def llm_pruner(self, num_layers: int, view_tokens: int | None = DEFAULT_VIEW_TOKENS) -> FastVPruner:
        self.check_llm(num_layers)
        return FastVPruner(self.layer, self.tokens, view_tokens)

    def llm_token_schedule(self, num_layers: int, visual_tokens: int, view_tokens: int | None = None) -> list[int]:
        """FastV's FLOPs formula: layers < K process all ``visual_tokens``, layers >= K the kept ones
        (``view_tokens`` None: ``visual_tokens`` is one view)."""
        self.check_llm(num_layers)
        kept = int(visual_keep_counts(torch.tensor([visual_tokens]), self.tokens, view_tokens or visual_tokens))
        return [visual_tokens] * self.layer + [kept] * (num_layers - self.layer)


@torch.no_grad()
def official_fastv(llm, lm_head, inputs_embeds: torch.Tensor, visual_mask: torch.Tensor, rank: int, agg_layer: int):
    """Re-enactment of the official inplace FastV forward on one unpadded sample (pkunlp-icler/FastV at
    d165972, ``src/transformers/src/transformers/models/llama/modeling_llama.py``, ``LlamaModel.forward``,
    ``USE_FAST_V and FASTV_INPLACE``), eager, every layer's attention map computed.

    llm: the ``LlamaModel`` (layers, norm, rotary_emb); lm_head: the output projection.
    inputs_embeds: (1, N, C); visual_mask: (1, N) bool, one contiguous image span (the official
    ``SYS_LENGTH`` = its start, ``IMAGE_TOKEN_LENGTH`` = its length); rank: ``ATTENTION_RANK``;
    agg_layer: ``AGG_LAYER`` (K). Returns (logits (1, N', vocab) of the kept tokens, keep_indexs (N',)).
    """
    length = inputs_embeds.shape[1]
    span = torch.nonzero(visual_mask[0]).flatten()
    sys_length, image_length = int(span[0]), int(span.numel())
    if int(span[-1]) - sys_length + 1 != image_length:
        raise ValueError("the official FastV ranks one contiguous image span")
    hidden = inputs_embeds
    position_ids = torch.arange(length, device=hidden.device)[None]
    keep_indexs = torch.arange(length, device=hidden.device)
    last_attention = None
    for idx in range(len(llm.layers)):
        if idx == agg_layer:
            avg = torch.mean(last_attention, dim=1)[0]
            last_tok = avg[-1]
            image_part = last_tok[sys_length : sys_length + image_length]
            top = image_part.topk(rank).indices + sys_length
            keep_indexs = torch.cat(
                (
                    torch.arange(sys_length, device=hidden.device),
                    top,
                    torch.arange(sys_length + image_length, length, device=hidden.device),
                )
            ).sort().values
            hidden = hidden[:, keep_indexs, :]
            position_ids = keep_indexs.unsqueeze(0)
        hidden, last_attention = eager_layer(llm, idx, hidden, position_ids)
    return lm_head(llm.norm(hidden)), keep_indexs
