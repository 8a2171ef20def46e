"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse subset of the visual tokens at the LLM input,
a greedy max-min diversity selection on the cosine distance of the tokens the LLM receives.

Official code: vbdi/divprune at 799e2d9, ``LLaVA/llava/model/llava_arch.py`` (``DivPrune``,
``pairwise_cosine_similarity`` and the ``LAYER_INDEX == '0'`` branch at the end of
``prepare_inputs_labels_for_multimodal``), run by ``run_Divprune.sh`` (``LAYER_INDEX=0 SUBSET_RATIO=0.098``).
What it does:

1. After the splice, it takes ``new_input_embeds[0][35 : 35 + L]``: the **projected** visual tokens as the
   LLM receives them (after ``mm_projector``), at the hard-coded offset 35 (the LLaVA-1.5 system prompt),
   ``L`` = the image feature length (576 on LLaVA-1.5; on LLaVA-NeXT the whole first image's feature list,
   base view + unpadded crops + image newlines, ~2000-2900).
2. ``D = 1 - cos`` over those tokens (``matrix / matrix.norm(dim=1)``, one ``mm``), in the model's dtype.
3. ``round(ratio * L)`` picks, greedily: the first pick is the token whose nearest other token is the
   farthest (``topk(D, 2, dim=0, largest=False).values[1]``, the second-smallest distance of each column:
   the smallest is the token to itself); each later pick the token whose minimum distance to the picks so
   far is the largest (``min(D[picks], dim=0)``, ``argmax``: the first index on ties).
4. The picks are sorted back into sequence order with every text token; the LLM runs on that sequence with
   contiguous positions (``position_ids`` is None in generate), so the KV cache holds the kept tokens only.

Where it acts, here: the same place, the LLM's input. The selection reads the input embeddings the splice
built (stage ``llm``, one drop before decoder layer 0, positions renumbered contiguously: exactly the
official sequence), so it sees the projected tokens, and on LLaVA-NeXT every visual token of the image,
newlines included, as the official does. A vision-side stage would select on the encoder's features
(``encoder_output`` acts before the projector): another feature space, not DivPrune's. A drop before layer 0
is a splice of fewer tokens, so this costs nothing over a vision-side method but the selection itself.

What we changed and why:

- Batch: the official reads batch index 0 and one image span at offset 35; each sample here selects among
  the visual positions the splice marks (any prompt template, any padding; several images of one sample
  form one pool), samples re-padded on the left (``visionzip.llm``).
- The distances are computed in float32 (the official: the model's dtype; float16 rounds ``1 - cos`` to
  steps of ~5e-4 near 0, which makes its argmax ties frequent and arbitrary).
- A token is never picked twice. The official can pick one again when every remaining token duplicates a
  pick (distance ~0; its keep list then repeats that token); ours picks one of the duplicates instead.
- Budget per view: ``tokens`` per 576-token view, a sample with V visual tokens keeps
  ``V * tokens // 576`` (exactly ``tokens`` on LLaVA-1.5; on NeXT the same share of its views' tokens, newlines
  included, as FastV here). ``ratio`` is the official rule, ``round(ratio * V)`` (``divprune:ratio=0.098``:
  the paper's setting, 56 of 576).

Multi-turn chat: the image is encoded once and the selection depends on the image tokens only (not the
prompt), so later turns continue on the pruned cache with nothing to redo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..llm import PruningContext
from .base import CompressionMethod, check_count, check_ratio, gather_tokens, register_method
from .fastv import DEFAULT_VIEW_TOKENS, visual_keep_counts


# ----- the selection ---------------------------------------------------------------------------------
def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """features (B, V, C) -> (B, V, V) ``1 - cos`` in float32, as the official ``pairwise_cosine_similarity``
    (``-s + 1`` in place is bit for bit ``1 - s``)."""
    x = features.float()
    normed = x / x.norm(dim=-1, keepdim=True)
    return torch.matmul(normed, normed.transpose(1, 2)).neg_().add_(1.0)


def divprune_picks(features: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """The greedy max-min picks of each row, in pick order.

    features: (B, V, C); valid: (B, V) bool, the candidates (padding slots False); count: picks to make
    (at most the fewest candidates of a row). -> (B, count) indices into V. One loop over the picks, batched
    over samples; each step reads the new pick's row of distances and updates every candidate's distance to
    its nearest pick (the official re-reads all picks' rows at every step: the same minimum).
    """
    batch, width = valid.shape
    padded = not bool(valid.all())
    distances = cosine_distances(features.masked_fill(~valid.unsqueeze(-1), 1.0) if padded else features)
    if padded:  # padding rows never count as a neighbour (the loop below reads the rows of picks only)
        distances.masked_fill_(~valid.unsqueeze(-1), float("inf"))
    # first pick: the candidate whose nearest other candidate is farthest: the second-smallest entry of its
    # column (the smallest is its distance to itself), as the official ``topk(2, dim=0, largest=False)[1]``
    # (a tie for the smallest gives that value twice, as topk does)
    smallest = distances.min(dim=1)
    second = distances.scatter(1, smallest.indices.unsqueeze(1), float("inf")).min(dim=1).values
    closest = second.masked_fill(~valid, float("-inf"))  # (B, V): the score each step maximises
    rows = distances.view(batch * width, width)
    offset = torch.arange(batch, device=valid.device) * width
    picks = []
    for step in range(count):
        pick = closest.argmax(dim=1)  # the first index of the largest, as the official torch.argmax
        picks.append(pick)
        flat = offset + pick
        row = rows.index_select(0, flat)
        closest = row.masked_fill(~valid, float("-inf")) if step == 0 else torch.minimum(closest, row)
        closest.view(-1).index_fill_(0, flat, float("-inf"))  # never picked twice (see the module docstring)
    return torch.stack(picks, dim=1)


def divprune_keep(features: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep mask of each sample's ``counts`` most diverse candidates.

    features: (B, N, C) the sequence's tokens; candidates: (B, N) bool (the visual tokens); counts: (B,) long,
    at most each row's candidates. -> (B, N) bool, True on the kept candidates only.
    """
    batch, length = candidates.shape
    most = int(counts.max()) if batch else 0
    if most == 0:
        return torch.zeros_like(candidates)
    # the candidates of each row first, in sequence order (ties of the argmax resolve as the official's)
    order = torch.sort(candidates.to(torch.uint8), dim=1, descending=True, stable=True).indices
    width = int(candidates.sum(dim=1).max())
    order = order[:, :width]
    valid = candidates.gather(1, order)
    picks = divprune_picks(gather_tokens(features, order), valid, most)  # (B, most)
    wanted = torch.arange(most, device=picks.device).unsqueeze(0) < counts.unsqueeze(1)
    # a row's picks past its count (and past its candidates, where the argmax runs out) go to a spare column
    positions = torch.where(wanted, order.gather(1, picks), length)
    keep = torch.zeros(batch, length + 1, dtype=torch.bool, device=candidates.device).scatter_(1, positions, True)
    return keep[:, :length] & candidates


def divprune_counts(visual: torch.Tensor, tokens: int | None, ratio: float | None, view_tokens: int | None) -> torch.Tensor:
    """Visual tokens each sample keeps. visual: (B,) long, its visual tokens -> (B,) long."""
    if ratio is not None:
        # the official ``int(round(threshold_ratio * image_feature_length))``: half to even, as Python's round
        keep = torch.round(visual.double() * ratio).long()
        return torch.minimum(keep, visual)
    return visual_keep_counts(visual, tokens, view_tokens)


@dataclass
class DivPrunePruner:
    """The ``LLMTokenPruner`` of DivPrune: one drop before decoder layer 0 (the LLM's input), positions
    renumbered contiguously (the official sequence); the selection reads the input embeddings only."""

    tokens: int | None
    ratio: float | None
    view_tokens: int | None = DEFAULT_VIEW_TOKENS
    layers: tuple[int, ...] = (0,)
    keep_original_positions: bool = False

    def score_layer(self, layer: int) -> int:
        return layer  # no attention is read

    def select(self, context: PruningContext) -> torch.Tensor:
        visual = context.visual_mask & context.valid_mask
        counts = divprune_counts(visual.sum(dim=1), self.tokens, self.ratio, self.view_tokens)
        return divprune_keep(context.hidden, visual, counts) | (context.valid_mask & ~context.visual_mask)


@register_method
@dataclass
class DivPrune(CompressionMethod):
    """DivPrune: ``tokens`` visual tokens per view (or the official ``ratio`` of them), the most diverse by
    greedy max-min cosine distance on the LLM's input embeddings; the LLM and its KV cache see only those."""

    name: ClassVar[str] = "divprune"
    display_name: ClassVar[str] = "DivPrune"
    stage: ClassVar[str] = "llm"
    summary: ClassVar[str] = "at the LLM input: the most diverse visual tokens (greedy max-min cosine distance)"
    reference: ClassVar[str] = "visionzip.methods.divprune.official_divprune"
    needs_attention_input: ClassVar[bool] = False

    tokens: int | None = None
    ratio: float | None = None

    def validate(self):
        if self.tokens is not None and self.ratio is not None:
            raise ValueError(
                f"divprune: give tokens (per view) or ratio (of each image's visual tokens), not both; got "
                f"tokens={self.tokens}, ratio={self.ratio}"
            )
        if self.ratio is not None:
            self.ratio = check_ratio("ratio", self.ratio)
            if self.ratio == 0:
                raise ValueError("divprune: ratio must be in (0, 1], got 0")
        else:
            self.tokens = check_count("tokens", 64 if self.tokens is None else self.tokens)
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> DivPrune:
        """``tokens`` per view; the paper's 64 / 128 / 192 rows are these budgets (its own setting,
        ``ratio=0.098``, keeps 56 of 576)."""
        return cls(tokens=check_count("visual tokens", tokens))

    def spec(self) -> str:
        if self.ratio is not None:
            return f"{self.name}:ratio={self.ratio:g}"
        return f"{self.name}:tokens={self.tokens}"

    def label(self) -> str:
        return f"divprune ratio {self.ratio:g}" if self.ratio is not None else f"divprune {self.tokens}"

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        view = DEFAULT_VIEW_TOKENS if num_tokens is None else num_tokens
        return int(divprune_counts(torch.tensor([view]), self.tokens, self.ratio, view))

    def check_view(self, num_tokens: int) -> None:
        if self.tokens is not None and self.tokens > num_tokens:
            raise ValueError(
                f"divprune keeps tokens = {self.tokens} per view, more than the {num_tokens} visual tokens of a view"
            )

    def check_llm(self, num_layers: int) -> None:
        check_count("num_layers", num_layers)

    def llm_pruner(self, num_layers: int, view_tokens: int | None = DEFAULT_VIEW_TOKENS) -> DivPrunePruner:
        self.check_llm(num_layers)
        return DivPrunePruner(self.tokens, self.ratio, view_tokens)

    def llm_token_schedule(self, num_layers: int, visual_tokens: int, view_tokens: int | None = None) -> list[int]:
        """Every layer processes the kept tokens only (the drop is before layer 0). ``view_tokens`` None:
        ``visual_tokens`` is one view."""
        self.check_llm(num_layers)
        kept = divprune_counts(torch.tensor([visual_tokens]), self.tokens, self.ratio, view_tokens or visual_tokens)
        return [int(kept)] * num_layers


# ----- the official code path, re-enacted ------------------------------------------------------------
def official_divprune_indices(visual_feature_vectors: torch.Tensor, image_feature_length: int, threshold_ratio: float):
    """``LlavaMetaForCausalLM.DivPrune`` of vbdi/divprune at 799e2d9 (``LLaVA/llava/model/llava_arch.py``), as
    written: visual_feature_vectors (L, C) -> the picks (K,) in pick order, K = ``round(ratio * L)``."""
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long, device=visual_feature_vectors.device)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i, device=cosine_matrix.device)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


@torch.no_grad()
def official_divprune(llm, lm_head, inputs_embeds: torch.Tensor, visual_mask: torch.Tensor, ratio: float):
    """Re-enactment of the official DivPrune LLaVA path on one unpadded sample (vbdi/divprune at 799e2d9,
    ``LLaVA/llava/model/llava_arch.py``, the ``LAYER_INDEX == '0'`` branch of
    ``prepare_inputs_labels_for_multimodal``, then the LLM's plain forward).

    llm: the ``LlamaModel``; lm_head: the output projection. inputs_embeds: (1, N, C) the spliced input;
    visual_mask: (1, N) bool, one contiguous image span (the official ``SYS_TOKEN_LEN`` = its start, its
    ``img_feature_len`` = its length); ratio: ``SUBSET_RATIO``. The distances are taken in float32 (see the
    module docstring). Returns (logits (1, N', vocab) of the kept sequence, keep_indexs (N',)).
    """
    span = torch.nonzero(visual_mask[0]).flatten()
    sys_token_len, img_feature_len = int(span[0]), int(span.numel())
    if int(span[-1]) - sys_token_len + 1 != img_feature_len:
        raise ValueError("the official DivPrune prunes one contiguous image span")
    device = inputs_embeds.device
    visual_tokens = inputs_embeds[0][sys_token_len : sys_token_len + img_feature_len].float()
    selected_visual_tokens = official_divprune_indices(visual_tokens, img_feature_len, ratio)
    selected_visual_tokens = selected_visual_tokens + sys_token_len
    keep_indexs = torch.cat(
        (
            torch.arange(sys_token_len, device=device),
            selected_visual_tokens,
            torch.arange(sys_token_len + img_feature_len, inputs_embeds.shape[1], device=device),
        )
    )
    keep_indexs = keep_indexs.sort().values
    kept = inputs_embeds[:, keep_indexs]
    # generate passes position_ids=None: the LLM numbers the kept sequence 0..N'-1
    hidden = llm(inputs_embeds=kept, use_cache=False).last_hidden_state
    return lm_head(hidden), keep_indexs
