"""PyramidDrop (Xing et al., CVPR 2025): visual tokens dropped in stages inside the LLM. Before each stage
layer, the hidden states entering it are projected by that layer's q and k; the last instruction token's
attention (averaged over heads) ranks the remaining visual tokens and the top ``ratio[s] * V`` stay.

Official code: Cooperx521/PyramidDrop at 6444f30, ``llava/model/modeling_llama_pdrop.py``
(``LlamaModel.pdrop_forward`` and ``pdrop_rank_drop``), settings from ``llava/eval/model_vqa_loader.py``
(``--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]``, 1.0 prepended). What it does, and
what we do instead:

- It computes the ranking layer's full attention map eagerly (one sample at a time); we compute only the
  last token's row from that layer's q and k, SDPA elsewhere.
- Kept tokens are renumbered contiguously (``position_ids = arange(len)`` after each drop) and decoding
  shifts each new token's position by the tokens dropped; we do the same (per sample).
- It drops only in prefill and keeps the KV cache it built: layers of stage s cache the tokens left at
  stage s. Same here.
- Its ``pdrop_rank_drop`` accepts only ``tokenizer_padding_side == "right"`` and re-pads on the right;
  we take any padding and re-pad on the left (generation continues from every sample's end).
- Visual tokens are one image span per sample (``image_token_posi`` = the first ``<image>``); we rank the
  visual positions the splice marks (several images, LLaVA-NeXT newlines included, as the official counts
  its whole image feature).

Budgets (``from_budget(T)``): PyramidDrop has no single-budget rule; the VisionZip / VisPruner tables
compare methods by the visual tokens left. We keep the official stage layers at quarters of the depth
(8 / 16 / 24 of 32) and a geometric schedule ending at ``T`` per 576-token view:
``ratios = (r^(1/3), r^(2/3), r)`` with ``r = T / 576`` (T = 72 is the official 0.5 / 0.25 / 0.125).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..eager_llama import eager_layer, query_key_attention
from ..llm import PruningContext, check_pruner_layers, top_visual
from .base import CompressionMethod, check_count, check_ratio, register_method

VIEW_TOKENS = 576  # visual tokens of one CLIP ViT-L/14-336 view (LLaVA-1.5 / NeXT)
OFFICIAL_RATIOS = (0.5, 0.25, 0.125)


def depth_quarters(num_layers: int) -> tuple[int, ...]:
    """The official stage layers (8, 16, 24 of 32) scaled to ``num_layers``."""
    return tuple(num_layers * q // 4 for q in (1, 2, 3))


@dataclass
class PDropPruner:
    """The ``LLMTokenPruner`` of PyramidDrop: drops before each of ``layers``, scored by that layer."""

    layers: tuple[int, ...]
    ratios: tuple[float, ...]
    keep_original_positions: bool = False

    def score_layer(self, layer: int) -> int:
        return layer

    def select(self, context: PruningContext) -> torch.Tensor:
        stage = self.layers.index(context.layer)
        rows = context.attention_rows(context.last_query_index())  # (B, H, 1, N)
        scores = rows.mean(dim=1)[:, 0]
        # int(V * ratio) as the official keep_length, V = the sample's visual tokens at the splice
        counts = (context.initial_visual.double() * self.ratios[stage]).long()
        counts = torch.minimum(counts, context.visual_mask.sum(dim=1))
        return top_visual(scores, context.visual_mask, counts) | (context.valid_mask & ~context.visual_mask)


@register_method
@dataclass
class PDrop(CompressionMethod):
    """PyramidDrop: before LLM layer ``layers[s]`` keep ``ratios[s]`` of the visual tokens (of those spliced
    in), ranked by the last token's attention in that layer. ``layers`` empty: quarters of the depth."""

    name: ClassVar[str] = "pdrop"
    stage: ClassVar[str] = "llm"
    summary: ClassVar[str] = "in the LLM: staged drops of visual tokens by the last token's attention"
    reference: ClassVar[str] = "visionzip.methods.pdrop.official_pdrop"
    needs_attention_input: ClassVar[bool] = False

    layers: tuple = ()
    ratios: tuple = OFFICIAL_RATIOS

    def validate(self):
        self.layers = tuple(self.layers)
        for layer in self.layers:
            check_count("layers", layer, minimum=1)
        self.ratios = tuple(check_ratio("ratios", r) for r in self.ratios)
        if not self.ratios:
            raise ValueError("pdrop: ratios must list one keep ratio per stage, got none")
        if any(r <= 0 for r in self.ratios):
            raise ValueError(f"pdrop: ratios must be > 0, got {list(self.ratios)}")
        if any(b > a for a, b in zip(self.ratios, self.ratios[1:])):
            raise ValueError(f"pdrop: ratios must not increase from stage to stage, got {list(self.ratios)}")
        if self.layers and len(self.layers) != len(self.ratios):
            raise ValueError(
                f"pdrop: {len(self.layers)} layers {list(self.layers)} but {len(self.ratios)} ratios {list(self.ratios)}"
            )
        if not self.layers and len(self.ratios) != 3:
            raise ValueError(f"pdrop: without layers (quarters of the depth) give 3 ratios, got {list(self.ratios)}")
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> PDrop:
        tokens = check_count("visual tokens", tokens)
        if tokens > VIEW_TOKENS:
            raise ValueError(f"pdrop: {tokens} visual tokens exceed the {VIEW_TOKENS} of a view")
        final = tokens / VIEW_TOKENS
        return cls(layers=(), ratios=(final ** (1 / 3), final ** (2 / 3), final))

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.layers or depth_quarters(num_layers)

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return int((num_tokens or VIEW_TOKENS) * self.ratios[-1])

    def label(self) -> str:
        return f"pdrop {self.tokens_per_view()}"

    def check_llm(self, num_layers: int) -> None:
        check_count("num_layers", num_layers)
        if not self.layers and num_layers < 4:
            raise ValueError(
                f"pdrop: quarters of the depth need an LLM of >= 4 layers, got {num_layers}; give layers=..."
            )
        check_pruner_layers("pdrop", self.resolved_layers(num_layers), num_layers)

    def llm_pruner(self, num_layers: int, view_tokens: int | None = None) -> PDropPruner:
        self.check_llm(num_layers)
        return PDropPruner(self.resolved_layers(num_layers), self.ratios)

    def llm_token_schedule(self, num_layers: int, visual_tokens: int, view_tokens: int | None = None) -> list[int]:
        """Visual tokens per layer: all before the first stage layer, ``int(V * ratio)`` from each stage on."""
        self.check_llm(num_layers)
        counts, current = [], visual_tokens
        stages = dict(zip(self.resolved_layers(num_layers), self.ratios))
        for layer in range(num_layers):
            if layer in stages:
                current = min(current, int(visual_tokens * stages[layer]))
            counts.append(current)
        return counts


@torch.no_grad()
def official_pdrop(llm, lm_head, inputs_embeds: torch.Tensor, visual_mask: torch.Tensor, layer_list, ratio_list):
    """Re-enactment of the official PyramidDrop inference forward on one unpadded sample (Cooperx521/PyramidDrop
    at 6444f30, ``llava/model/modeling_llama_pdrop.py``, ``pdrop_forward`` + ``pdrop_rank_drop``, not
    training), eager.

    llm: the ``LlamaModel``; lm_head: the output projection; inputs_embeds: (1, N, C); visual_mask: (1, N)
    bool, one contiguous image span (``image_token_posi``, ``image_tokens``); layer_list / ratio_list as the
    official command line (1.0 is prepended, as its eval scripts do).
    Returns (logits (1, N', vocab), kept positions (N',) in the input's index space).
    """
    ratios = [1.0] + list(ratio_list)
    span = torch.nonzero(visual_mask[0]).flatten()
    image_index, image_tokens_full = int(span[0]), int(span.numel())
    if int(span[-1]) - image_index + 1 != image_tokens_full:
        raise ValueError("the official PyramidDrop ranks one contiguous image span")
    hidden = inputs_embeds
    kept = torch.arange(hidden.shape[1], device=hidden.device)
    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    for layer_idx in range(len(llm.layers)):
        hidden, _ = eager_layer(llm, layer_idx, hidden, position_ids)
        rank_layer = layer_idx + 1
        if rank_layer in layer_list:
            stage = list(layer_list).index(rank_layer)
            image_tokens = int(image_tokens_full * ratios[stage])
            keep_length = int(image_tokens_full * ratios[stage + 1])
            attn = query_key_attention(llm, rank_layer, hidden, position_ids)  # (1, H, n, n)
            prompt_total_len = hidden.shape[1]  # prompt_len + image_tokens: the last prompt token is last
            text_attn = attn[0][:, prompt_total_len - 1, :].unsqueeze(1)
            avg_head = torch.mean(text_attn, dim=0)[:, image_index : image_index + image_tokens]
            avg_text = torch.mean(avg_head, dim=0)
            top = avg_text.topk(keep_length).indices + image_index
            top = top.sort().values
            start = image_index + image_tokens
            order = torch.cat([torch.arange(image_index, device=hidden.device), top,
                               torch.arange(start, hidden.shape[1], device=hidden.device)])
            hidden = hidden[:, order, :]
            kept = kept[order]
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    return lm_head(llm.norm(hidden)), kept
