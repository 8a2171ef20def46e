"""Compression on Qwen-VL: the methods act on the resampler's 256 queries, the tokens the LLM receives.

The ViT's patches never reach the LLM: the resampler turns them into ``n_queries`` (256) tokens, each a
learned query's cross-attention over all patches. A budget is therefore a number of queries per image (of
256), and ``QwenResamplerQueries`` presents the vision side to the methods (``visionzip/methods``) as a
sequence of 256 query tokens without CLS (``has_cls = False``): ``run`` captures the resampler's outputs
(before ``ln_post`` / ``proj``, which the model applies to whatever tokens a method returns, as LLaVA's
projector), and ``queries_keys`` / ``received_attention`` give the methods their scoring inputs.

Scoring (VisPruner paper, "other architectures", on Qwen-VL: "we first extract attention for each patch token
from the visual encoder, and then track each query's attention towards patch tokens in the Q-Former; the
integration of these two components yields the visual attention for the final query sequence"). The
OpenCLIP ViT of Qwen-VL has no CLS token (the official ``visual.py`` builds none), so a patch's attention in
the encoder is the attention it receives in the last block (the one the resampler reads), averaged over heads
and over all patch rows (VisionZip appendix A.2's received attention for CLS-free encoders). A query's
importance is its head-mean cross-attention over the patches (what the official ``nn.MultiheadAttention`` call
returns) weighted by those patch attentions: ``importance[q] = sum_p cross[q, p] * patch[p]`` (our reading of
"integration", docs/qwen_vl.md; the paper gives no formula and the VisPruner repository has only the LLaVA
path). The merge / diversity feature of a query is its resampler output.

What each method does here (nothing below branches on a method's name; the stage decides what can run):

- ``vispruner``: important queries by the traced importance, diverse ones by the official duplicate
  removal over the query outputs (the VisPruner paper's Qwen-VL setting, Table 4);
- ``visionzip``: dominant = top queries by the traced importance (no CLS to keep), contextual = the rest
  merged into uniformly spaced targets by cosine similarity of the query outputs (our analogue: the VisionZip
  paper has no Qwen-VL setting);
- ``random`` and ``pooling`` (the queries' 16 x 16 sin-cos grid is their layout) run as defined;
- PruMerge needs a CLS row and refuses itself (no CLS here); tower-stage methods (ToMe, downsample) are
  refused: the resampler's keys carry a 2D position table resized to the full patch grid, which merged or
  re-sized patch sets no longer form;
- in-LLM methods (FastV, PDrop, SparseVLM, DART, CDPruner, DivPrune) prune among the 256 visual tokens of each
  image inside the LLM, through ``visionzip.decoder_loop`` (``QwenVLForCausalLM._pruned_forward``).
"""
from __future__ import annotations

import torch

from visionzip import CompressionConfig
from visionzip.encoders import EncoderCapture, VisionEncoderAdapter


class QwenResamplerQueries(VisionEncoderAdapter):
    """Qwen-VL's vision side as a sequence of resampler queries (module docstring).

    visual: the ``QwenVisionTransformer``. ``run`` -> ``EncoderCapture(hidden=(B, Q, E) query outputs,
    attn_input=(B, Q, E + 1) float32 [query outputs | traced importance] or None, layer_index=last ViT block)``.
    """

    has_cls = False
    family = "qwen_vl_resampler"

    def __init__(self, visual):
        self.model = visual
        self.core = visual
        self.layers = visual.blocks
        self.config = None

    # ----- geometry: the query grid --------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def patches_per_side(self) -> int:
        """Queries per side of their 2D sin-cos grid (16 for 256 queries)."""
        return round(self.model.num_queries**0.5)

    @property
    def patch_size(self) -> int:
        """Pixels per side of a query's grid cell."""
        return self.image_size // self.patches_per_side

    @property
    def num_patches(self) -> int:
        return self.model.num_queries

    @property
    def hidden_size(self) -> int:
        return self.model.output_dim

    # ----- running -------------------------------------------------------------------------------------
    def run(self, pixel_values: torch.Tensor, select_layer: int = -1, capture_attn_input: bool = True,
            early_exit: bool = True) -> EncoderCapture:
        """The whole vision side up to the resampler (every ViT block: the resampler reads the last one, so
        there is nothing to exit early from); with ``capture_attn_input`` also each query's traced importance
        (module docstring). Plain tensor code, as ``VisionEncoderAdapter.run``."""
        self.check_pixels(pixel_values)
        index = self.layer_index(select_layer)
        if index != self.num_layers - 1:
            raise ValueError(
                f"select_layer={select_layer}: Qwen-VL's resampler reads the last ViT block (-1); there is no other layer to compress"
            )
        visual = self.model
        hidden = visual.embed(pixel_values)
        for block in self.layers[:-1]:
            hidden = block(hidden)
        last_input = hidden
        hidden = self.layers[-1](hidden)
        queries, cross = visual.attn_pool(hidden, trace=capture_attn_input)
        scoring = None
        if capture_attn_input:
            patch = visual.patch_attention(last_input)  # (B, P)
            importance = torch.matmul(cross.float(), patch.unsqueeze(-1))  # (B, Q, 1)
            # float32 whatever the model's dtype: half precision would round near scores into ties
            scoring = torch.cat([queries.float(), importance], dim=-1)
        return EncoderCapture(queries, scoring, index)

    def queries_keys(self, layer_index: int, attn_input: torch.Tensor, query_rows: slice | None = None):
        """The query sequence's scoring inputs, from ``run``'s ``attn_input``: q (B, 1, Q, 1) each query's traced
        importance (there is no attention row that scores the queries: their score is traced through the
        resampler), k (B, 1, Q, E) the query outputs (the merge metric, ``k.mean(dim=1)``), scale 1."""
        if attn_input is None:
            raise ValueError("the query scores need run(..., capture_attn_input=True)")
        importance = attn_input[..., -1:].unsqueeze(1)
        if query_rows is not None:
            importance = importance[:, :, query_rows]
        return importance, attn_input[..., :-1].unsqueeze(1), 1.0

    def received_attention(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, Q) each query's traced importance (the ``q`` of ``queries_keys``)."""
        return q[:, 0, :, 0].float()


def check_qwen_vl_compression(adapter: QwenResamplerQueries, config: CompressionConfig, num_layers: int) -> None:
    """Budget and applicability of ``config`` on Qwen-VL, before anything runs (ValueError naming the method,
    the value and the limit or the reason): vision-side methods against the ``n_queries`` queries, in-LLM
    methods against the LLM's ``num_layers`` and the queries an image puts into it."""
    if not config.enabled:
        return
    settings = config.settings
    if settings.stage == "tower":
        raise ValueError(
            f"{settings.name} acts inside the vision tower (stage 'tower'), and Qwen-VL's resampler needs the ViT's "
            f"full {adapter.model.grid_side} x {adapter.model.grid_side} patch grid (its keys carry a 2D position "
            f"table resized to that grid): use a method over the {adapter.num_tokens} resampler queries "
            "(vispruner, visionzip, random, pooling) or an in-LLM method"
        )
    if settings.stage == "llm":
        settings.check_llm(num_layers)
        settings.check_view(adapter.num_tokens)
        return
    settings.check(adapter, -1)
