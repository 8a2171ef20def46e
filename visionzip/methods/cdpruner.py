"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs"): keep the visual tokens that a conditional DPP selects -- a kernel of the
tokens' cosine similarity weighted by each token's relevance to the instruction, greedy MAP inference with
the fast Cholesky-style update -- before the LLM sees them.

Official code: Theia-4869/CDPruner at 9541616 (2025-09-20), ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``: relevance, kernel, fast MAP; ``prepare_inputs_labels_for_multimodal``:
the index masks on LLaVA-1.5 and on LLaVA-NeXT's crops), ``llava/model/multimodal_encoder/clip_encoder.py``
(``load_text_tower``, ``forward``: the CLIP text tower and the image embeds), ``llava/eval/model_vqa_loader.py``
(``texts=question``: the question without LLaVA's answer-format suffix). What it does:

- similarity: cosine of the **projected** visual tokens (after ``mm_projector``), (B, N, N) in float32;
- relevance: cosine between the selected layer's features passed through CLIP's ``post_layernorm`` and
  ``visual_projection`` and the CLIP **text tower**'s embedding of the question (77-token segments), loaded
  from the vision tower's folder (``openai/clip-vit-large-patch14-336`` ships both towers; LLaVA checkpoints
  do not); ``relevance = (-cos).mean(texts)`` -- **negated** (the authors observed the inversion with CLIP
  only: CDPruner issues #9, #14) -- then min-max normalised over the **whole** (views, N) tensor, + 1e-6;
- kernel ``L = r_i S_ij r_j``; the paper's ``exp(alpha r)``, ``alpha = theta / (2 (1 - theta))`` is commented
  out in the released code (the relevance enters as it is);
- greedy MAP of the DPP (Chen et al. 2018, laming-chen/fast-map-dpp): ``visual_token_num`` picks per view;
- LLaVA-NeXT: every crop (base image included) keeps ``visual_token_num`` tokens of its own 576, chosen on
  the crop alone but with the relevance normalised across all crops; then the spatial layout, ``unpad``
  (which cuts selected tokens that fall on padding) and the image newlines, always kept.

What we do (``[VisionZip-LLaVA]``):

- The relevance uses the **LLM's input embeddings** of the instruction instead of the CLIP text tower, and
  the projected visual tokens instead of CLIP's joint-space image embeds: LLaVA checkpoints (and the tiny
  ones here) ship a ``CLIPVisionModel`` without text tower or CLIP tokenizer, and the issue's interface
  for text-conditioned methods is ``visionzip.llm.PruningContext`` (the prompt's ``inputs_embeds``). This is
  the variant ports of CDPruner to models without a CLIP text tower use (openvinotoolkit/openvino.genai
  ``cdpruner/relevance_calculator.cpp`` for Qwen2-VL: projected visual tokens against the LLM embedding of
  each instruction token, the same negated mean and min-max). The negation is kept (``invert_relevance``,
  default true as the released code; false flips it).
- The instruction: the sample's text tokens after its last visual token (the question in LLaVA's
  ``<image>\\n{question}`` prompt, plus the template's ``ASSISTANT:``); a prompt with no text after its image
  uses all its text tokens; none at all (or a constant relevance, where the official divides by zero):
  relevance 1, a pure diversity DPP.
- Stage ``llm``, before decoder layer 0 (``CDPrunerPruner.layers == (0,)``): the LLM's layers and KV cache
  only ever hold the kept tokens, positions renumbered contiguously, as in the official re-splice.
- Per sample, batched: each sample's relevance is normalised over its own visual tokens (the official
  normalises over the whole batch tensor, which at its batch size 1 is the same thing), the greedy runs for
  all samples at once, left padding anywhere.
- Budget per view as FastV here: a sample with V visual tokens keeps ``V * tokens // view_tokens`` of them
  in **one** DPP over all its visual tokens (several images, NeXT's base + crops + newlines together). On
  LLaVA-1.5 with one image that is exactly the official selection; with several images, and on NeXT, the
  official picks ``tokens`` per image / crop (and keeps NeXT's newlines outside the budget): the visual
  mask the LLM receives does not say which view a token came from.
- The greedy computes a picked token's kernel row when it picks it (``greedy_dpp_map``) instead of the
  whole (N, N) kernel; bit-identical tokens (NeXT's image newlines) tie exactly, and which of them is kept
  follows float rounding, in the official code as here.
- Chat: the first turn's prefill prunes by the first question; later turns continue on the pruned cache.
  (The official ``serve/cli.py`` and ``eval/run_llava.py`` pass no ``texts``: ``encode_images`` cannot
  unpack the tower's output there; only its eval scripts run CDPruner.)

The reference re-enactment (``official_cdpruner_selection``: ``encode_images`` after the tower, verbatim;
``official_cdpruner``: the re-splice and an eager LLM on one unpadded sample) is what the tests hold the
fast path to.

Shapes: B batch, N sequence, V visual tokens (padded per sample), C hidden, M text tokens, T picks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..eager_llama import eager_layer
from ..llm import PruningContext
from .base import CompressionMethod, check_count, register_method
from .fastv import DEFAULT_VIEW_TOKENS, visual_keep_counts


# ----- the fast path: pure tensor functions ----------------------------------------------------------
def instruction_mask(visual_mask: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """The text tokens CDPruner rates the visual tokens against: each sample's valid text tokens after its
    last visual token, or all its text tokens where none follow. (B, N) bool, (B, N) bool -> (B, N) bool."""
    text = valid_mask & ~visual_mask
    positions = torch.arange(visual_mask.shape[1], device=visual_mask.device)
    last_visual = torch.where(visual_mask, positions, -1).max(dim=1).values  # (B,)
    after = text & (positions.unsqueeze(0) > last_visual.unsqueeze(1))
    return torch.where(after.any(dim=1, keepdim=True), after, text)


def conditional_relevance(
    visual: torch.Tensor, visual_valid: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, invert: bool = True
) -> torch.Tensor:
    """Each visual token's relevance to the instruction, min-max normalised per sample as the official
    ``encode_images`` does at batch size 1: ``(-cos).mean(text)``, ``(r - min + 1e-6) / (max - min)``.

    visual: (B, V, C); visual_valid: (B, V) bool; text: (B, M, C); text_valid: (B, M) bool -> (B, V) float32
    (1 where a sample has no text or a constant relevance; padding 0).
    """
    image_embeds = visual.float()
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text.float()
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    # padding slots (zero embeddings: 0 / 0) must not reach the sums
    image_embeds = image_embeds.masked_fill(~visual_valid.unsqueeze(-1), 0.0)
    text_embeds = text_embeds.masked_fill(~text_valid.unsqueeze(-1), 0.0)
    cosine = torch.matmul(image_embeds, text_embeds.transpose(1, 2))  # (B, V, M)
    if invert:
        cosine = -cosine
    weights = text_valid.float().unsqueeze(1)
    relevance = (cosine * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1)  # (B, V)
    low = relevance.masked_fill(~visual_valid, float("inf")).min(dim=1, keepdim=True).values
    high = relevance.masked_fill(~visual_valid, float("-inf")).max(dim=1, keepdim=True).values
    spread = high - low
    flat = (spread <= 0) | ~text_valid.any(dim=1, keepdim=True)
    normalised = (relevance - low + 1e-6) / torch.where(flat, torch.ones_like(spread), spread)
    normalised = torch.where(flat, torch.ones_like(normalised), normalised)
    return normalised.masked_fill(~visual_valid, 0.0)


def greedy_dpp_map(normalized: torch.Tensor, relevance: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP inference of the DPP with kernel ``L_ij = r_i (x_i . x_j) r_j`` and the fast incremental
    Cholesky update (the official loop, batched): ``count`` picks per sample, in the order chosen (each
    prefix is the greedy answer for that many).

    The official builds the whole (V, V) kernel; the loop reads only the picked tokens' rows, so each row
    is computed when its token is picked, from the unit features: ``count * V * C`` multiply-adds instead of
    ``V * V * C`` (9x fewer at 64 of 576 tokens), the same products up to float rounding. Each row is a
    matrix-vector product whose every entry is one dot product of two tokens, whatever the batch and its
    padding: bit-identical tokens (NeXT's image newlines) get bit-identical gains, in a batch as alone (one
    (V, V) matrix product is faster on a CPU, 158 vs 280 ms at V = 576, C = 4096, T = 64, but its tiles
    round identical rows apart differently for different V: a batch would break the newlines' ties unlike
    its samples alone). The greedy is ``count`` dependent steps (the official algorithm), ~15 device
    operators each.

    normalized: (B, V, C) float32 unit features (0 on padding); relevance: (B, V) float32; valid: (B, V)
    bool (padding is never picked while a valid token is left) -> (B, count) long. Past a sample's valid
    tokens the picks are meaningless (callers cut them).
    """
    batch, size, width = normalized.shape
    # cis (B, T, V): row t is pick t's Cholesky column over all tokens; the rows not written yet are zeros,
    # so the official sum over the earlier picks is a product over all T rows (fewer ops per step)
    cis = normalized.new_zeros(batch, count, size)
    diagonal = relevance * (normalized * normalized).sum(dim=-1) * relevance
    di2s = diagonal.masked_fill(~valid, float("-inf"))  # (B, V)
    picks = []
    for i in range(count):
        j = torch.argmax(di2s, dim=-1, keepdim=True)  # (B, 1)
        picks.append(j)
        feature = normalized.gather(1, j.unsqueeze(-1).expand(-1, 1, width))  # (B, 1, C)
        similarity = torch.bmm(normalized, feature.view(batch, width, 1))[..., 0]  # (B, V)
        row = relevance.gather(1, j) * similarity * relevance  # the kernel's row j
        column = cis.gather(2, j.unsqueeze(1).expand(-1, count, 1))  # (B, T, 1)
        eis = (row - torch.bmm(column.transpose(1, 2), cis)[:, 0]) / torch.sqrt(di2s.gather(1, j))
        cis[:, i] = eis
        di2s.addcmul_(eis, eis, value=-1.0)
        di2s.scatter_(1, j, float("-inf"))
    if not picks:
        return torch.empty(batch, 0, dtype=torch.long, device=normalized.device)
    return torch.cat(picks, dim=1)


def cdpruner_select(
    inputs_embeds: torch.Tensor,
    visual_mask: torch.Tensor,
    text_mask: torch.Tensor,
    counts: torch.Tensor,
    invert_relevance: bool = True,
) -> torch.Tensor:
    """CDPruner's selection on the LLM's input: each sample keeps ``counts`` of its visual tokens.

    inputs_embeds: (B, N, C) (visual tokens = the projected features); visual_mask, text_mask: (B, N) bool
    (the visual tokens; the instruction's text tokens); counts: (B,) long (<= each sample's visual tokens)
    -> (B, N) bool, True on the kept visual tokens (False elsewhere).
    """
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    size = max(int(visual_mask.sum(dim=1).max()), 1)
    # each sample's visual tokens first, in order (a stable sort), padded to the longest
    visual_index = torch.sort((~visual_mask).to(torch.uint8), dim=1, stable=True).indices[:, :size]
    visual_valid = visual_mask.gather(1, visual_index)
    text_size = max(int(text_mask.sum(dim=1).max()), 1)
    text_index = torch.sort((~text_mask).to(torch.uint8), dim=1, stable=True).indices[:, :text_size]
    text_valid = text_mask.gather(1, text_index)
    features = inputs_embeds.gather(1, visual_index.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
    text = inputs_embeds.gather(1, text_index.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))

    # the official: normalised in the features' dtype, then float32
    normalized = (features / features.norm(dim=-1, keepdim=True)).float()
    normalized = normalized.masked_fill(~visual_valid.unsqueeze(-1), 0.0)
    relevance = conditional_relevance(features, visual_valid, text, text_valid, invert_relevance)

    most = int(counts.max()) if counts.numel() else 0
    picks = greedy_dpp_map(normalized, relevance, visual_valid, most)  # (B, most)
    taken = torch.arange(most, device=device).unsqueeze(0) < counts.unsqueeze(1)
    chosen = torch.zeros(batch, size, dtype=torch.bool, device=device)
    chosen.scatter_(1, picks, taken)  # a pick past a sample's count writes False
    chosen &= visual_valid
    keep = torch.zeros(batch, length, dtype=torch.bool, device=device)
    return keep.scatter(1, visual_index, chosen)


@dataclass
class CDPrunerPruner:
    """The ``LLMTokenPruner`` of CDPruner: one drop before decoder layer 0 (the LLM sees the kept tokens
    only), contiguous positions; it reads the input embeddings, no attention."""

    tokens: int
    view_tokens: int | None = DEFAULT_VIEW_TOKENS
    invert_relevance: bool = True
    keep_original_positions: bool = False

    @property
    def layers(self) -> tuple[int, ...]:
        return (0,)

    def score_layer(self, layer: int) -> int:
        return layer

    def select(self, context: PruningContext) -> torch.Tensor:
        if context.layer != 0:
            raise ValueError(f"cdpruner selects before decoder layer 0, was asked at layer {context.layer}")
        if context.inputs_embeds is None or context.input_visual_mask is None:
            raise ValueError(
                "cdpruner needs the prompt's input embeddings and their visual mask (PruningContext.inputs_embeds, "
                "input_visual_mask): this model's forward does not provide them"
            )
        visual = context.input_visual_mask & context.valid_mask
        counts = visual_keep_counts(visual.sum(dim=1), self.tokens, self.view_tokens)
        text = instruction_mask(visual, context.valid_mask)
        chosen = cdpruner_select(context.inputs_embeds, visual, text, counts, self.invert_relevance)
        return chosen | (context.valid_mask & ~visual)


@register_method
@dataclass
class CDPruner(CompressionMethod):
    """CDPruner: ``tokens`` visual tokens per view, the greedy MAP of a DPP whose kernel is the tokens'
    cosine similarity weighted by their relevance to the instruction, chosen before the LLM's first layer."""

    name: ClassVar[str] = "cdpruner"
    display_name: ClassVar[str] = "CDPruner"
    stage: ClassVar[str] = "llm"
    summary: ClassVar[str] = "before the LLM: the DPP-diverse visual tokens, weighted by relevance to the prompt"
    reference: ClassVar[str] = "visionzip.methods.cdpruner.official_cdpruner"
    needs_attention_input: ClassVar[bool] = False

    tokens: int = 64
    invert_relevance: bool = True

    def validate(self):
        self.tokens = check_count("tokens", self.tokens)
        if not isinstance(self.invert_relevance, bool):
            raise ValueError(f"invert_relevance must be true or false, got {self.invert_relevance!r}")
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> CDPruner:
        """The paper's rows (Tables 1-2: 192 / 128 / 64 on LLaVA-1.5, per crop on NeXT): ``tokens`` = the
        budget, the released code's relevance (inverted)."""
        return cls(tokens=check_count("visual tokens", tokens))

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.tokens if num_tokens is None else min(self.tokens, num_tokens)

    def label(self) -> str:
        return f"cdpruner {self.tokens}"

    def check_view(self, num_tokens: int) -> None:
        if self.tokens > num_tokens:
            raise ValueError(
                f"cdpruner keeps tokens = {self.tokens} per view, more than the {num_tokens} visual tokens of a view"
            )

    def check_llm(self, num_layers: int) -> None:
        check_count("num_layers", num_layers)

    def llm_pruner(self, num_layers: int, view_tokens: int | None = DEFAULT_VIEW_TOKENS) -> CDPrunerPruner:
        self.check_llm(num_layers)
        return CDPrunerPruner(self.tokens, view_tokens, self.invert_relevance)

    def llm_token_schedule(self, num_layers: int, visual_tokens: int, view_tokens: int | None = None) -> list[int]:
        """Every layer processes the kept tokens only (``view_tokens`` None: ``visual_tokens`` is one view)."""
        self.check_llm(num_layers)
        kept = int(visual_keep_counts(torch.tensor([visual_tokens]), self.tokens, view_tokens or visual_tokens))
        return [kept] * num_layers


# ----- the official code path, re-enacted ------------------------------------------------------------
@torch.no_grad()
def official_cdpruner_selection(
    image_features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, visual_token_num: int
) -> torch.Tensor:
    """``LlavaMetaForCausalLM.encode_images`` of Theia-4869/CDPruner at 9541616 (``llava/model/llava_arch.py``)
    after the tower and the projector, verbatim.

    image_features: (B, N, D) projected visual tokens; image_embeds: (B, N, E) the features the relevance
    reads (official: CLIP's joint-space image embeds); text_embeds: (M, E) (official: the CLIP text tower's);
    -> index_masks (B, N) bool, ``visual_token_num`` True per row.
    """
    B, N, C = image_features.shape
    device = image_features.device

    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, D)
    image_normalized = image_normalized.float()  # (B, N, D)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)

    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B, N, C)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, C)
    relevance = torch.matmul(image_embeds, text_embeds.t())  # (B, N, M)
    relevance = (-relevance).mean(dim=-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())  # (B, N)

    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)

    cis = torch.zeros((visual_token_num, B, N), device=device)  # (T, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)  # (T, B)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j

        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) / torch.sqrt(
            di2s[torch.arange(B), j]
        ).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")

    select_idx = torch.sort(select_idx.t()).values  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, select_idx, True)
    return index_masks


@torch.no_grad()
def official_cdpruner(llm, lm_head, inputs_embeds: torch.Tensor, visual_mask: torch.Tensor, visual_token_num: int):
    """The official CDPruner forward on one unpadded sample, with our relevance inputs: the selection of
    ``official_cdpruner_selection`` on the sample's visual tokens as one view (image_features = the projected
    tokens; image_embeds = the same in float32, as the official's CLIP embeds are; text_embeds = the LLM
    input embeddings of the text after the image, ``instruction_mask``), then ``prepare_inputs_labels_for_
    multimodal``'s re-splice (``image_features[index_masks]`` between the text, positions ``arange``) and
    the LLM, eager, layer by layer (the official runs LLaVA's LLaMA unmodified).

    llm: the ``LlamaModel``; lm_head: the output projection; inputs_embeds: (1, N, C); visual_mask: (1, N)
    bool -> (logits (1, N', vocab), kept positions (N',) ascending).
    """
    visual = visual_mask[0]
    text = instruction_mask(visual_mask, torch.ones_like(visual_mask))[0]
    image_features = inputs_embeds[:, visual]  # (1, V, C)
    index_masks = official_cdpruner_selection(image_features, image_features.float(), inputs_embeds[0, text].float(), visual_token_num)
    keep = ~visual
    keep[torch.nonzero(visual).flatten()[index_masks[0]]] = True
    kept = torch.nonzero(keep).flatten()
    hidden = inputs_embeds[:, kept]
    position_ids = torch.arange(kept.numel(), device=hidden.device)[None]
    for idx in range(len(llm.layers)):
        hidden, _ = eager_layer(llm, idx, hidden, position_ids)
    return lm_head(llm.norm(hidden)), kept
