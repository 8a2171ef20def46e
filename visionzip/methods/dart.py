"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More"): inside the LLM, before layer K, a few pivot tokens are picked -- the visual tokens and the
instruction tokens whose layer-(K-1) keys have the largest L1 norm -- and each pivot in turn claims the visual
tokens least similar to it (cosine of the hidden states after the LLM's final norm) among those not claimed
yet. The image pivots and the claimed tokens stay; the other visual tokens leave the sequence and the KV cache
of layers K... No attention map is read, so it runs with SDPA / FlashAttention.

Official code: ZichenWen1/DART at 5a19452 (2025-08-31; read from its fork xqy1111111/DART, which carries the
upstream history; the LLaVA files last changed in 9fee9fa), ``llava/model/language_model/modeling_llama_self.py``
(``DART.forward`` and ``DART.get_retained_image_token``; LLaVA's LLaMA of transformers 4.37, its decoder layers
changed to also return their q / k / v), settings in ``llava/eval/model_vqa_loader.py`` (``configure_DART``)
and ``scripts/v1_5/eval/*.sh``: ``--pruned_layer 2 --pivot_image_token 4 --pivot_text_token 4
--image_token_start_index 35 --image_token_length 576 --max_num_trunction M`` (the README's example: M = 128).
What it does, and what we do instead:

- Pivots: the ``pivot_image_token`` image tokens and the ``pivot_text_token`` tokens after the image (the
  question and "ASSISTANT:") whose keys in layer K-1 (RoPE applied, all heads concatenated) have the largest
  L1 norm. The text pivots depend on the prompt: DART is text-conditioned. Same here; the text candidates
  are a sample's valid non-visual tokens after its last visual token.
- Budget: each of the P = 4 + 4 pivots claims ``M // P`` tokens, and the image pivots stay too: the scripts'
  M = 64 / 128 / 192 keep 68 / 132 / 196 visual tokens (4 + 8 x 8, ...). ``dart:tokens=T`` keeps exactly T
  per view: the pivots claim T - 4 tokens, ``(T - 4) // P`` each and one more for the first ``(T - 4) % P``
  (in the order they claim). ``from_budget(64)`` keeps 64; the official row "64" is ``dart:tokens=68``
  (its quotas divide evenly: the official selection, token for token). On LLaVA-NeXT the official keeps
  ``retain_token_num_for_llava_next`` = 320 (+ 4 pivots) whatever the script's M (the scripts never set
  it); here a sample with V visual tokens keeps ``V * T // 576`` (as FastV here: the same share of its
  views' tokens, image newlines included).
- Order: the pivots claim in the iteration order of a Python ``set`` of their sequence indices
  (``for item in list(indices_set)``), which CPython fixes by hash-table slot (index mod 32 for 8 pivots,
  collisions probed), not by rank or position. The order matters where two pivots' least similar tokens
  overlap, so we keep it: the pivots' indices in each sample's unpadded sequence go to the host (B x 8
  integers, once, in the prefill: the drop that follows reads the kept count from the device anyway) and
  the same ``set`` orders them.
- It hard-codes LLaVA-1.5's image span (start 35, length 576; on NeXT the span ends where the prompt's text
  begins) and asserts batch size 1; we take each sample's visual tokens from the splice (any span, several
  images, per-sample counts), select per sample in a left-padded batch, and keep every token of a text-only
  sample.
- Kept tokens keep their position ids (as the official ``position_ids = keep_indexs``); the layers from K on
  cache only the kept tokens (``visionzip.llm``), and later chat turns reuse that cache: the image is
  pruned once, by the pivots of the first turn's question. The official chat (``llava/serve/cli.py``)
  re-runs the whole conversation each turn and so re-prunes with the text after the image so far.
- Layer: K = 2 wherever an LLM has it (>= 3 layers: every LLaVA LLM); K = 1 on a 2-layer test model. The
  cosine uses the LLM's final norm (``self.norm``) as the official does. Norms and similarities are
  computed in float32 (the official: in the model's float16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..copied import copied_from
from ..eager_llama import apply_rotary_pos_emb, eager_layer
from ..llm import PruningContext, check_pruner_layers, top_visual
from .base import CompressionMethod, check_count, register_method
from .fastv import DEFAULT_VIEW_TOKENS, OneDropPruner, visual_keep_counts

OFFICIAL_LAYER = 2  # --pruned_layer in every official script
COSINE_EPS = 1e-8  # F.cosine_similarity's default eps


def resolve_layer(layer: int, num_layers: int) -> int:
    """The pruning layer on an LLM of ``num_layers`` layers: ``layer``, or (0) the official 2 where it fits,
    else the last layer (``num_layers - 1``; a layer must precede the drop to give its keys)."""
    return layer or max(1, min(OFFICIAL_LAYER, num_layers - 1))


def claim_quotas(claimed: int, pivots: int) -> list[int]:
    """Tokens each of ``pivots`` pivots claims, in claiming order, for ``claimed`` in all: ``claimed //
    pivots`` each (the official ``TOKEN_TOPK``), one more for the first ``claimed % pivots``."""
    if pivots == 0:
        return []
    share, extra = divmod(claimed, pivots)
    return [share + (j < extra) for j in range(pivots)]


def official_claim_order(image_pivots: list[int], text_pivots: list[int]) -> list[int]:
    """The order in which the official code's pivots claim tokens: ``for item in list(indices_set)`` with
    ``indices_set = set(image_indices + query_indices)`` -- CPython's slot order for these integers (the
    sequence indices of one unpadded sample, image pivots by descending key norm inserted first)."""
    return list(set(image_pivots + text_pivots))


def claim_least_similar(
    vectors: torch.Tensor, candidates: torch.Tensor, order: torch.Tensor, quotas: torch.Tensor
) -> torch.Tensor:
    """Each pivot in turn claims its quota of the candidates least similar (cosine) to it, among those not
    claimed yet.

    vectors: (B, N, C); candidates: (B, N) bool; order: (B, P) pivot positions in claiming order; quotas:
    (B, P) long (0 for a row's unused slots) -> (B, N) bool, the claimed tokens. The similarity follows
    ``F.cosine_similarity``'s own steps (each vector over its norm, then the product summed) with the unit
    vectors computed once for all pivots: the official numbers, bit for bit, at a third of the work.
    """
    unit = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    claimed = torch.zeros_like(candidates)
    for j in range(order.shape[1]):
        pivot = unit.gather(1, order[:, j, None, None].expand(-1, 1, unit.shape[-1]))  # (B, 1, C)
        dissimilarity = -(pivot * unit).sum(dim=-1)  # (B, N)
        step = top_visual(dissimilarity, candidates & ~claimed, quotas[:, j])
        claimed |= step
    return claimed


@dataclass
class DARTPruner(OneDropPruner):
    """The ``LLMTokenPruner`` of DART: one drop, before layer ``layer``, pivots ranked by layer ``layer - 1``'s keys."""

    image_pivots: int = 4
    text_pivots: int = 4

    def select(self, context: PruningContext) -> torch.Tensor:
        if context.keys is None or context.final_norm is None or context.hidden is None:
            raise ValueError(
                "dart needs the scoring layer's keys, the hidden states and the LLM's final norm in the "
                "PruningContext (PruningContext.keys / hidden / final_norm); this model's forward does not give them"
            )
        visual, valid = context.visual_mask, context.valid_mask
        batch, length = visual.shape
        device = visual.device
        counts = visual_keep_counts(visual.sum(dim=1), self.tokens, self.view_tokens)  # (B,)
        keys = context.keys()  # (B, Hkv, N, D)
        # the official L1 norm of each token's keys, all heads concatenated; in float32, where bfloat16's 8
        # mantissa bits would tie many of a few thousand tokens (the official runs float16)
        norms = torch.linalg.vector_norm(keys.float().transpose(1, 2).reshape(batch, length, -1), ord=1, dim=-1)
        positions = torch.arange(length, device=device)
        last_visual = torch.where(visual, positions, -1).max(dim=1).values
        text = valid & ~visual & (positions > last_visual.unsqueeze(1)) & (counts > 0).unsqueeze(1)
        image_pick = min(self.image_pivots, length)
        text_pick = min(self.text_pivots, length)
        image_top = norms.masked_fill(~visual, float("-inf")).topk(image_pick, dim=1).indices
        text_top = norms.masked_fill(~text, float("-inf")).topk(text_pick, dim=1).indices
        image_count = torch.minimum(counts, torch.tensor(self.image_pivots, device=device))
        text_count = torch.minimum(text.sum(dim=1), torch.tensor(self.text_pivots, device=device))
        # each token's index in its sample's unpadded sequence (the official index space)
        unpadded = valid.long().cumsum(dim=1) - 1
        host = torch.cat(
            [image_top, text_top, unpadded.gather(1, image_top), unpadded.gather(1, text_top),
             torch.stack([image_count, text_count, counts], dim=1)], dim=1,
        ).tolist()  # the one host read: B x (2 x pivots + 3) integers
        order_rows, quota_rows = [], []
        for row in host:
            image_index, text_index = row[:image_pick], row[image_pick : image_pick + text_pick]
            rest = row[image_pick + text_pick :]
            n_image, n_text, keep_count = rest[-3:]
            image_unpadded, text_unpadded = rest[:n_image], rest[image_pick : image_pick + n_text]
            where = dict(zip(image_unpadded + text_unpadded, image_index[:n_image] + text_index[:n_text]))
            order_rows.append([where[i] for i in official_claim_order(image_unpadded, text_unpadded)])
            quota_rows.append(claim_quotas(keep_count - n_image, len(order_rows[-1])))
        width = max((len(o) for o in order_rows), default=0)
        order = torch.tensor([o + [0] * (width - len(o)) for o in order_rows], dtype=torch.long, device=device)
        quotas = torch.tensor([q + [0] * (width - len(q)) for q in quota_rows], dtype=torch.long, device=device)
        image_rank = torch.arange(image_pick, device=device).unsqueeze(0)
        keep = torch.zeros_like(visual)
        keep.scatter_(1, image_top, image_rank < image_count.unsqueeze(1))
        normed = context.final_norm(context.hidden).float()  # (B, N, C); float32 for the same reason
        keep |= claim_least_similar(normed, visual & ~keep, order, quotas)
        return keep | (valid & ~visual)


@register_method
@dataclass
class DART(CompressionMethod):
    """DART: ``tokens`` visual tokens per view survive from LLM layer K on: ``image_pivots`` pivots and the
    tokens least similar to them and to ``text_pivots`` instruction pivots (largest key norms at layer K-1).
    ``layer`` 0: the official K = 2 (the last layer on a 2-layer LLM)."""

    name: ClassVar[str] = "dart"
    display_name: ClassVar[str] = "DART"
    stage: ClassVar[str] = "llm"
    summary: ClassVar[str] = "in the LLM: keep the visual tokens least similar to a few pivot tokens at layer K"
    positional: ClassVar[tuple[str, ...]] = ("tokens", "layer")
    reference: ClassVar[str] = "visionzip.methods.dart.official_dart"
    needs_attention_input: ClassVar[bool] = False

    tokens: int = 64
    layer: int = 0  # 0: OFFICIAL_LAYER, resolved against the LLM's depth
    image_pivots: int = 4
    text_pivots: int = 4

    def validate(self):
        self.tokens = check_count("tokens", self.tokens)
        self.layer = check_count("layer", self.layer, minimum=0)
        self.image_pivots = check_count("image_pivots", self.image_pivots)
        self.text_pivots = check_count("text_pivots", self.text_pivots, minimum=0)
        if self.tokens < self.image_pivots:
            raise ValueError(
                f"dart keeps its image pivots: tokens = {self.tokens} must be >= image_pivots = {self.image_pivots}"
            )
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> DART:
        """The paper's settings (K = 2, 4 image and 4 text pivots) keeping exactly ``tokens`` per view (the
        official scripts' ``--max_num_trunction M`` keeps M + 4: ``dart:tokens=68`` is its row "64")."""
        tokens = check_count("visual tokens", tokens)
        return cls(tokens=tokens, layer=0, image_pivots=min(4, tokens), text_pivots=4)

    def tokens_per_view(self, num_tokens: int | None = None) -> int:
        return self.tokens if num_tokens is None else min(self.tokens, num_tokens)

    def label(self) -> str:
        return f"dart {self.tokens}" + (f" K={self.layer}" if self.layer else "")

    def check_view(self, num_tokens: int) -> None:
        if self.tokens > num_tokens:
            raise ValueError(f"dart keeps tokens = {self.tokens} per view, more than the {num_tokens} visual tokens of a view")

    def check_llm(self, num_layers: int) -> None:
        check_count("num_layers", num_layers)
        check_pruner_layers("dart", (resolve_layer(self.layer, num_layers),), num_layers)

    def llm_pruner(self, num_layers: int, view_tokens: int | None = DEFAULT_VIEW_TOKENS) -> DARTPruner:
        self.check_llm(num_layers)
        return DARTPruner(resolve_layer(self.layer, num_layers), self.tokens, view_tokens,
                          image_pivots=self.image_pivots, text_pivots=self.text_pivots)

    def llm_token_schedule(self, num_layers: int, visual_tokens: int, view_tokens: int | None = None) -> list[int]:
        """Layers < K process all ``visual_tokens``, layers >= K the kept ones (``view_tokens`` None:
        ``visual_tokens`` is one view)."""
        self.check_llm(num_layers)
        layer = resolve_layer(self.layer, num_layers)
        kept = int(visual_keep_counts(torch.tensor([visual_tokens]), self.tokens, view_tokens or visual_tokens))
        return [visual_tokens] * layer + [kept] * (num_layers - layer)


# ----- the official code path, re-enacted ----------------------------------------------------------------
# Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaAttention.forward: the keys a
# layer computes (the official decoder layer returns them, after RoPE and repeat_kv, as layer_outputs[-2])
@copied_from("transformers.models.llama.modeling_llama.LlamaAttention.forward", sha="32a79445373f688d", version="5.25.0")
def official_key_states(llm, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The key states (1, H, N, D) of layer ``layer_index`` of ``llm`` on ``hidden`` (1, N, C): input norm,
    k projection, RoPE, repeated to every query head (the official SDPA layer returns them so)."""
    layer = llm.layers[layer_index]
    attn = layer.self_attn
    length = hidden.shape[1]
    normed = layer.input_layernorm(hidden)
    keys = attn.k_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = llm.rotary_emb(hidden, position_ids)
    keys = apply_rotary_pos_emb(keys, keys, cos, sin)[1]
    return keys.repeat_interleave(attn.num_key_value_groups, dim=1)


def official_retained_image_token(
    last_layer_state: torch.Tensor,
    any_states: torch.Tensor,
    image_token_start_index: int,
    image_token_length: int,
    max_num_trunction: int,
    pivot_image_token: int,
    pivot_text_token: int,
    extra_first: int = 0,
) -> torch.Tensor:
    """``DART.get_retained_image_token`` (official, see the module docstring), its config passed in.

    last_layer_state: (1, N, C) the hidden states entering layer K after the final norm; any_states: (1, H, N, D)
    layer K-1's keys. ``extra_first`` [VisionZip-LLaVA]: the first ``extra_first`` pivots (in the set's
    order) claim one token more (our exact budgets; 0 is the official code). -> the retained image indices.
    """
    token_topk = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    device = last_layer_state.device
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)

    k_states_image_token = any_states[0][image_token_start_index : image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length :, :]
    k_states_image_token_l1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_l1_norm = torch.norm(k_states_query_token, p=1, dim=-1)

    image_indices = (k_states_image_token_l1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (
        k_states_query_token_l1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length
    ).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)

    valid_indices_list = list(valid_indices)
    for step, item in enumerate(list(indices_set)):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -F.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk + int(step < extra_first)).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)

    indices_set.difference_update(query_indices)
    return torch.tensor(list(indices_set), device=device)


@torch.no_grad()
def official_dart(
    llm,
    lm_head,
    inputs_embeds: torch.Tensor,
    visual_mask: torch.Tensor,
    pruned_layer: int,
    max_num_trunction: int,
    pivot_image_token: int = 4,
    pivot_text_token: int = 4,
    extra_first: int = 0,
):
    """Re-enactment of the official DART forward on one unpadded sample (``DART.forward``, see the module
    docstring), eager: at layer ``pruned_layer`` (K) the retained image tokens are chosen from layer K-1's
    output (after ``llm.norm``) and keys, the rest of the image span leaves; kept tokens keep their positions.

    llm: the ``LlamaModel`` (layers, norm, rotary_emb); lm_head: the output projection. inputs_embeds: (1, N, C);
    visual_mask: (1, N) bool, one contiguous image span (the official ``image_token_start_index`` = its start,
    ``image_token_length`` = its length; on NeXT, the text after it is the official ``text_length``).
    max_num_trunction: M (on NeXT the official ``retain_token_num_for_llava_next``). Returns (logits
    (1, N', vocab) of the kept tokens, keep_indexs (N',)).
    """
    length = inputs_embeds.shape[1]
    span = torch.nonzero(visual_mask[0]).flatten()
    image_token_start_index, image_token_length = int(span[0]), int(span.numel())
    if int(span[-1]) - image_token_start_index + 1 != image_token_length:
        raise ValueError("the official DART prunes one contiguous image span")
    hidden = inputs_embeds
    position_ids = torch.arange(length, device=hidden.device)[None]
    keep_indexs = torch.arange(length, device=hidden.device)
    any_states = None
    for idx in range(len(llm.layers)):
        if idx == pruned_layer:
            last_layer_state = llm.norm(hidden)
            retained = official_retained_image_token(
                last_layer_state, any_states, image_token_start_index, image_token_length, max_num_trunction,
                pivot_image_token, pivot_text_token, extra_first,
            )
            keep_indexs = torch.cat(
                (
                    torch.arange(image_token_start_index, device=hidden.device),
                    retained,
                    torch.arange(image_token_start_index + image_token_length, length, device=hidden.device),
                )
            ).sort().values
            hidden = hidden[:, keep_indexs, :]
            position_ids = keep_indexs.unsqueeze(0)
        if idx == pruned_layer - 1:
            any_states = official_key_states(llm, idx, hidden, position_ids)
        hidden, _ = eager_layer(llm, idx, hidden, position_ids)
    return lm_head(llm.norm(hidden)), keep_indexs
