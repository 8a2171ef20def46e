"""SparseVLM (Zhang et al., ICML 2025), v1.0: text-guided visual-token sparsification inside the LLM with
token recycling.

Official code: Gumpest/SparseVLMs at 26a5f48, ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaModel.forward``), ``score.py`` (``attn_postprocess_topk``, the per-budget tables) and ``utils.py``
(``cluster_and_merge``). The steps (docs/methods.md, "sparsevlm"):

1. Raters, once, on the input embeddings: ``softmax(V T^T, over text).mean(over visual)`` for the text
   tokens T after the image; the text tokens above the mean rate the visual tokens.
2. After each sparse layer (2, 6, 15) its attention (heads averaged, the raters' rows over the visual
   columns, averaged over raters) keeps the top ``min(count, v - 1)`` visual tokens.
3. Recycling: the 30 % (+1) best-rated pruned tokens (taken from that layer's output) are clustered
   (DPC-kNN, ``int(n / 10) + 1`` centres) and the cluster means go right after the kept visual tokens.
4. Positions are renumbered contiguously; decoding continues each layer's positions from its cache.

What we changed and why: the rater rows are computed from q and k (no eager attention maps, SDPA kept);
each sample has its own raters, selection and clusters (the official reads batch index 0 and hard-codes a
576-token image at ``pre_prompt_length_list[0]``); the visual positions come from the splice; the
clustering's ``torch.rand * 1e-6`` density noise (a tie breaker, and ties are systematic: two mutual
nearest neighbours have equal density) is drawn from a generator seeded ``seed + stage`` per sample instead
of the global RNG, so results are reproducible and a batch gives what its samples give alone; counts scale
per view on LLaVA-NeXT (``count * V // view_tokens``); a budget's sparse layers are the official 2 / 6 / 15
on every LLM deep enough for them and the same fractions of the depth on a shallower one (``paper_layers``;
the official code hard-codes ``pruning_loc = [2, 6, 15]``, written for LLaVA-1.5's 32- and 40-layer LLMs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..eager_llama import eager_layer
from ..llm import PruningContext, Selection, check_pruner_layers, top_visual
from .base import CompressionMethod, check_count, register_method

VIEW_TOKENS = 576
# score.py (v1.0): visual tokens left after layers 2 / 6 / 15, per RETAIN_TOKN budget
SPARSEVLM_BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
OFFICIAL_LAYERS = (2, 6, 15)
OFFICIAL_DEPTH = 32  # LLaVA-1.5-7B's LLM, where the official layers sit
RECYCLE_SHARE = 0.3


def paper_layers(num_layers: int) -> tuple[int, ...]:
    """The sparse layers of a paper budget on an LLM of ``num_layers`` decoder layers: the official
    (2, 6, 15) wherever they fit (>= 17 layers: every LLaVA LLM, 7B and 13B alike, as the official code
    hard-codes them); on a shallower LLM the same fractions of a 32-layer depth, ``round(l * L / 32)``
    (halves up), each at least one past the previous: (0, 1, 2) on 4 layers, (1, 2, 4) on 8."""
    check_count("num_layers", num_layers)
    if num_layers >= OFFICIAL_LAYERS[-1] + 2:
        return OFFICIAL_LAYERS
    if num_layers < len(OFFICIAL_LAYERS) + 1:
        raise ValueError(
            f"sparsevlm: the paper's {len(OFFICIAL_LAYERS)} sparse layers, scaled to the depth, need an LLM of "
            f">= {len(OFFICIAL_LAYERS) + 1} layers (one must follow the last), got {num_layers}; give layers=..."
        )
    layers: list[int] = []
    for layer in OFFICIAL_LAYERS:
        scaled = int(layer * num_layers / OFFICIAL_DEPTH + 0.5)
        layers.append(max(scaled, layers[-1] + 1) if layers else scaled)
    return tuple(layers)  # 15 / 32 of L rounds to <= L - 2 for every L >= 4


def text_raters(embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters of one sample: embeds (N, C), visual (N,) bool -> indices of the rating text tokens
    (the tokens after the last visual token whose mean relevance to the visual tokens is above average).
    A sample without visual tokens (text-only, in a batch with images) has none: (0,)."""
    positions = torch.nonzero(visual).flatten()
    if positions.numel() == 0:
        return positions  # nothing to rate: the sample is left alone (select keeps all its tokens)
    text_start = int(positions[-1]) + 1
    if text_start >= embeds.shape[0]:
        raise ValueError(
            "sparsevlm rates visual tokens by the text after the image, but a sample has 0 text tokens after "
            "its last visual token (at least 1 needed)"
        )
    relevance = (embeds[positions] @ embeds[text_start:].T).softmax(dim=1).mean(dim=0)
    raters = torch.nonzero(relevance > relevance.mean()).flatten()
    if raters.numel() == 0:
        # all equally relevant (e.g. one text token): the official code averages over no rows (NaN); all rate
        raters = torch.arange(relevance.shape[0], device=embeds.device)
    return raters + text_start


def rater_rows(inputs_embeds: torch.Tensor, input_visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's raters (``text_raters``) as query rows: inputs_embeds (B, N, C), input_visual_mask (B, N)
    bool -> (index (B, Q) long, weight (B, Q) float32): each sample's raters in order in the input's index
    space, padded with its first rater (weight 0); weight 1 / raters on the others. A sample without visual
    tokens: index 0, weight 0 (its scores are unused)."""
    raters = [text_raters(e, v) for e, v in zip(inputs_embeds, input_visual_mask)]
    batch, device = inputs_embeds.shape[0], inputs_embeds.device
    longest = max(1, max(len(r) for r in raters))
    index = torch.zeros(batch, longest, dtype=torch.long, device=device)
    weight = torch.zeros(batch, longest, device=device)
    for row, rater in enumerate(raters):
        if len(rater) == 0:
            continue
        index[row, : len(rater)] = rater
        index[row, len(rater):] = rater[0]
        weight[row, : len(rater)] = 1.0 / len(rater)
    return index, weight


def cluster_and_merge(tokens: torch.Tensor, clusters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DPC-kNN clustering of ``tokens`` (B, N, C) into ``clusters`` means (B, clusters, C), as the official
    ``utils.cluster_and_merge``, including its ``rand * 1e-6`` density noise: it breaks the ties that are
    systematic here (two mutual nearest neighbours have equal density when few clusters are asked for).
    ``generator``: where the noise is drawn from (None: the global RNG, as the official code)."""
    batch, length, width = tokens.shape
    dist = torch.cdist(tokens.float(), tokens.float()) / width**0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    noise = torch.rand(density.shape, generator=generator, device=density.device, dtype=density.dtype)
    density = density + noise * 1e-6
    higher = (density[:, None, :] > density[:, :, None]).to(dist.dtype)
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent_dist = (dist * higher + dist_max * (1 - higher)).min(dim=-1).values
    centres = (parent_dist * density).topk(clusters, dim=-1).indices  # (B, clusters)
    to_centre = dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, length))  # (B, clusters, N)
    assignment = to_centre.argmin(dim=1)  # (B, N)
    assignment.scatter_(1, centres, torch.arange(clusters, device=tokens.device).expand(batch, -1))
    sums = tokens.new_zeros(batch, clusters, width).scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, width), tokens)
    counts = tokens.new_zeros(batch, clusters).scatter_add_(1, assignment, tokens.new_ones(batch, length))
    return sums / (counts + 1e-6).unsqueeze(-1)


def recycled_count(pruned: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for ``pruned`` tokens: ``int(0.3 n) + 1`` and ``int(that / 10) + 1``."""
    recycled = int(pruned * RECYCLE_SHARE) + 1
    return recycled, int(recycled / 10) + 1


@dataclass
class SparseVLMPruner:
    """The ``LLMTokenPruner`` of SparseVLM: drops after each sparse layer, scored by that layer."""

    sparse_layers: tuple[int, ...]
    counts: tuple[int, ...]
    recycle: bool = True
    view_tokens: int | None = VIEW_TOKENS
    seed: int = 0
    keep_original_positions: bool = False

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer + 1 for layer in self.sparse_layers)

    def score_layer(self, layer: int) -> int:
        return layer - 1

    def select(self, context: PruningContext) -> Selection:
        stage = self.layers.index(context.layer)
        batch = context.visual_mask.shape[0]
        device = context.visual_mask.device
        # the raters depend on the input only: found once per prefill (context.memo), in the input's index
        # space; each stage maps them to their current positions (text tokens are never dropped)
        if "sparsevlm.raters" not in context.memo:
            context.memo["sparsevlm.raters"] = rater_rows(context.inputs_embeds, context.input_visual_mask)
        rater_index, weight = context.memo["sparsevlm.raters"]
        valid_now = context.valid_mask
        length_in = context.inputs_embeds.shape[1]
        # where each input token sits now (a spare column for the re-padding slots, whose index is arbitrary)
        now = torch.zeros(batch, length_in + 1, dtype=torch.long, device=device)
        now.scatter_(1, torch.where(valid_now, context.input_index, length_in),
                     torch.arange(valid_now.shape[1], device=device).expand(batch, -1))
        query = now.gather(1, rater_index)
        rows = context.attention_rows(query).mean(dim=1)  # (B, Q, N)
        scores = (rows * weight.unsqueeze(-1)).sum(dim=1)  # (B, N)
        visual_now = context.visual_mask.sum(dim=1)
        count = self.counts[stage]
        target = torch.full_like(visual_now, count) if self.view_tokens is None else (
            context.initial_visual * count // self.view_tokens)
        keep_visual = top_visual(scores, context.visual_mask, torch.minimum(target, visual_now - 1).clamp_min(0))
        keep = keep_visual | (context.valid_mask & ~context.visual_mask)
        last_visual = torch.where(context.visual_mask, torch.arange(scores.shape[1], device=device), -1).max(dim=1).values
        width = context.hidden.shape[-1]
        pieces = []
        for row in range(batch):
            pruned = torch.nonzero(context.visual_mask[row] & ~keep_visual[row]).flatten()
            if not self.recycle or len(pruned) == 0:
                pieces.append(context.hidden.new_zeros(0, width))
                continue
            recycled, clusters = recycled_count(len(pruned))
            best = scores[row, pruned].topk(recycled).indices
            generator = torch.Generator(device=device).manual_seed(self.seed + stage)
            pieces.append(cluster_and_merge(context.hidden[row, pruned[best]].unsqueeze(0), clusters, generator)[0])
        most = max(p.shape[0] for p in pieces)
        extra = context.hidden.new_zeros(batch, most, width)
        extra_valid = torch.zeros(batch, most, dtype=torch.bool, device=device)
        for row, piece in enumerate(pieces):
            extra[row, : piece.shape[0]] = piece
            extra_valid[row, : piece.shape[0]] = True
        return Selection(keep, extra, extra_valid, last_visual.clamp_min(0))


@register_method
@dataclass
class SparseVLM(CompressionMethod):
    """SparseVLM v1.0: after LLM layer ``layers[s]`` keep ``counts[s]`` visual tokens per view, rated by
    the text tokens most relevant to the image; the best-rated pruned ones are recycled into clusters.
    ``layers`` empty (what a budget gives): the official 2 / 6 / 15, scaled down on an LLM too shallow
    for them (``paper_layers``)."""

    name: ClassVar[str] = "sparsevlm"
    stage: ClassVar[str] = "llm"
    summary: ClassVar[str] = "in the LLM: text-rated visual-token sparsification with token recycling"
    reference: ClassVar[str] = "visionzip.methods.sparsevlm.official_sparsevlm"
    needs_attention_input: ClassVar[bool] = False

    layers: tuple = ()  # empty: paper_layers(depth)
    counts: tuple = SPARSEVLM_BUDGETS[64]
    recycle: bool = True
    seed: int = 0

    def validate(self):
        self.layers = tuple(self.layers)
        self.counts = tuple(check_count("counts", c) for c in self.counts)
        self.seed = check_count("seed", self.seed, minimum=0)
        if not isinstance(self.recycle, bool):
            raise ValueError(f"sparsevlm: recycle must be true or false, got {self.recycle!r}")
        for layer in self.layers:
            check_count("layers", layer, minimum=0)
        if not self.layers and len(self.counts) != len(OFFICIAL_LAYERS):
            raise ValueError(
                f"sparsevlm: without layers (the paper's {list(OFFICIAL_LAYERS)}, scaled to shallow LLMs) give "
                f"{len(OFFICIAL_LAYERS)} counts, got {list(self.counts)}"
            )
        if self.layers and len(self.layers) != len(self.counts):
            raise ValueError(
                f"sparsevlm: {len(self.layers)} layers {list(self.layers)} but {len(self.counts)} counts "
                f"{list(self.counts)}; give one count per layer"
            )
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> SparseVLM:
        """The official table (score.py, v1.0): only these budgets exist. The layers are the official ones
        where the LLM has them (resolved against its depth when the model is known: ``paper_layers``)."""
        if tokens not in SPARSEVLM_BUDGETS:
            raise ValueError(
                f"sparsevlm has per-layer tables for {sorted(SPARSEVLM_BUDGETS)} visual tokens only, got {tokens}; "
                "give sparsevlm:layers=...,counts=... for others"
            )
        return cls(layers=(), counts=SPARSEVLM_BUDGETS[tokens])

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.layers or paper_layers(num_layers)

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        # the count left after the last stage does not depend on where the stages sit
        depth = max(self.layers) + 2 if self.layers else OFFICIAL_DEPTH
        return self.llm_token_schedule(depth, num_tokens or VIEW_TOKENS)[-1]

    def label(self) -> str:
        return f"sparsevlm {'/'.join(str(c) for c in self.counts)}"

    def check_llm(self, num_layers: int) -> None:
        check_count("num_layers", num_layers)
        for layer in self.resolved_layers(num_layers):
            if not 0 <= layer <= num_layers - 2:
                raise ValueError(
                    f"sparsevlm: sparse layer {layer} is outside [0, {num_layers - 2}] for an LLM of {num_layers} "
                    "decoder layers (visual tokens leave after a sparse layer, so one layer must follow it)"
                )
        check_pruner_layers("sparsevlm", tuple(layer + 1 for layer in self.resolved_layers(num_layers)), num_layers)

    def llm_pruner(self, num_layers: int, view_tokens: int | None = VIEW_TOKENS) -> SparseVLMPruner:
        self.check_llm(num_layers)
        return SparseVLMPruner(self.resolved_layers(num_layers), self.counts, self.recycle, view_tokens, self.seed)

    def llm_token_schedule(self, num_layers: int, visual_tokens: int, view_tokens: int | None = None) -> list[int]:
        """Visual tokens per layer: the kept ones plus the recycled clusters from each sparse layer on."""
        view = view_tokens or visual_tokens
        stages = dict(zip(self.resolved_layers(num_layers), self.counts))
        out, current = [], visual_tokens
        for layer in range(num_layers):
            out.append(current)
            if layer in stages:
                kept = max(min(visual_tokens * stages[layer] // view, current - 1), 0)
                clusters = recycled_count(current - kept)[1] if self.recycle and current > kept else 0
                current = kept + clusters
        return out


@torch.no_grad()
def official_sparsevlm(llm, lm_head, inputs_embeds, visual_mask, layers, counts, noise_seed: int | None = None):
    """Re-enactment of the official SparseVLM v1.0 inference forward on one unpadded sample (Gumpest/SparseVLMs
    at 26a5f48, ``modelling_sparse_llama.py`` ``LlamaModel.forward``, ``score.attn_postprocess_topk``,
    ``utils.cluster_and_merge`` with its random tie noise), eager. ``counts`` are absolute (the official
    table for a 576-token image). ``noise_seed``: None draws the noise from the global RNG as the official
    code; an int draws stage s's from a generator seeded ``noise_seed + s`` (what the fast path does, so that
    results are reproducible and do not depend on the batch). Returns (logits (1, N', vocab), visual tokens
    after the last sparse layer)."""
    span = torch.nonzero(visual_mask[0]).flatten()
    v_token_start, v_token_num = int(span[0]), int(span.numel())
    text_token_start = v_token_start + v_token_num
    hidden = inputs_embeds
    v_t = hidden[:, v_token_start:text_token_start, :]
    t_t = hidden[:, text_token_start:, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    position_ids = torch.arange(hidden.shape[1])[None]
    table = dict(zip(layers, counts))
    for layer_idx in range(len(llm.layers)):
        out, attn = eager_layer(llm, layer_idx, hidden, position_ids)
        if layer_idx in table:
            avg = attn.mean(1)
            rows = t_token_idx[1] + text_token_start
            relation = avg[:, rows, v_token_start : v_token_start + v_token_num].mean(1)
            mask = torch.zeros_like(relation, dtype=torch.bool)
            _, indices = torch.topk(relation, min(table[layer_idx], v_token_num - 1), dim=1)
            mask[0][indices] = True
            policy = torch.ones(1, out.shape[1], dtype=torch.bool)
            policy[:, v_token_start:text_token_start] = mask
            sparse_idx = torch.where(~policy)[1]
            stage1 = torch.where(~mask)[1]
            stage1_scores = relation[0][stage1]
            recycled = int(stage1.shape[0] * RECYCLE_SHARE) + 1
            stage2 = stage1_scores.topk(recycled)[1]
            sparse_tokens = out[:, sparse_idx][:, stage2]
            clusters = int(sparse_tokens.shape[1] / 10) + 1
            generator = None
            if noise_seed is not None:
                generator = torch.Generator(device=out.device).manual_seed(noise_seed + list(layers).index(layer_idx))
            merged = cluster_and_merge(sparse_tokens, clusters, generator)
            select = out[:, torch.where(policy)[1]]
            kept = int(mask.sum())
            hidden = torch.cat([select[:, : v_token_start + kept], merged, select[:, v_token_start + kept :]], dim=1)
            position_ids = position_ids[:, : hidden.shape[1]]
            v_token_num = kept + clusters
            text_token_start = v_token_start + v_token_num
        else:
            hidden = out
    return lm_head(llm.norm(hidden)), v_token_num
