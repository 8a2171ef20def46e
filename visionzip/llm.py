"""In-LLM token pruning, model-agnostic: the pruner protocol and the tensor functions the LLM's forward
uses to drop visual tokens between decoder layers (FastV, PyramidDrop, ...).

How an LLM's forward applies an ``LLMTokenPruner`` (``llava.model.language_model.llava_llama`` does it):

- before decoder layer ``L`` in ``pruner.layers`` (prefill only), it asks ``pruner.select`` for a keep mask
  (B, N) over the current sequence; the attention the selection reads is computed by the model for the
  rows asked only (``PruningContext.attention_rows``: that layer's q and k, RoPE, causal and padding
  mask; SDPA stays the attention kernel of every layer);
- the unkept tokens leave the hidden states, position ids and attention mask (``drop_tokens``); each sample
  keeps its own tokens, samples are re-padded on the left when their counts differ;
- layers from ``L`` on cache only the kept tokens: per-layer KV caches of different lengths. ``PrunedPrefix``
  records, in the caller's index space, which prefix tokens each later group of layers holds, so that
  decoding (and later chat turns) builds each group's padding mask and positions from the caller's.

Shapes: B batch, N sequence, H heads, Q query rows, C hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch

AttentionRows = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PruningContext:
    """What a pruner sees when asked to select before decoder layer ``layer``.

    visual_mask: (B, N) bool, visual tokens still in the sequence. valid_mask: (B, N) bool, not padding.
    initial_visual: (B,) long, visual tokens each sample had when spliced in (ratios refer to it).
    attention_rows(query_index (B, Q) long) -> (B, H, Q, N) float32 softmax attention of those query rows
    in the layer ``pruner.score_layer(layer)`` run on the sequence as it entered that layer (the sequence
    the masks above describe).
    """

    layer: int
    visual_mask: torch.Tensor
    valid_mask: torch.Tensor
    initial_visual: torch.Tensor
    attention_rows: AttentionRows
    # (B, N, C) the hidden states entering ``layer``; (B, N) each token's position in the input; the input
    # embeddings (B, N0, C) and their visual mask (B, N0) (text-guided methods rate the text with them)
    hidden: torch.Tensor | None = None
    input_index: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    input_visual_mask: torch.Tensor | None = None
    # () -> (B, Hkv, N, D): the keys (RoPE applied) of layer ``pruner.score_layer(layer)`` on the sequence as it
    # entered that layer, computed when called (DART ranks its pivot tokens by their L1 norm); the LLM's final
    # norm, (B, N, C) -> (B, N, C) (DART compares hidden states after it, as its official code does)
    keys: Callable[[], torch.Tensor] | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    # one dict shared by every selection of one prefill: what a multi-stage pruner computes once from the
    # input (SparseVLM's raters) and reads again at its later stages
    memo: dict = field(default_factory=dict)

    def last_query_index(self) -> torch.Tensor:
        """(B, 1): each sample's last non-padding position (the prompt's last token)."""
        return last_valid_index(self.valid_mask).unsqueeze(1)


@runtime_checkable
class LLMTokenPruner(Protocol):
    """The pruning schedule an in-LLM method gives the LLM's forward (``CompressionMethod.llm_pruner``).

    layers: decoder-layer indices (ascending) before which tokens are dropped: >= 1 for pruners that rank by
    attention (layer ``score_layer``'s on its input); 0 for one that reads only the input embeddings
    (CDPruner: the LLM then holds the kept tokens only, as after a before-LLM method).
    keep_original_positions: True (FastV) keeps each kept token's position id; False (PyramidDrop)
    renumbers them contiguously (a kept token's position drops by the number of tokens removed before it,
    and later tokens continue from there).
    """

    layers: tuple[int, ...]
    keep_original_positions: bool

    def score_layer(self, layer: int) -> int:
        """Index of the decoder layer whose attention (on its input) scores the drop before ``layer``."""

    def select(self, context: PruningContext) -> torch.Tensor:
        """(B, N) bool keep mask over the current sequence; padding may be either."""


# ----- tensor functions ------------------------------------------------------------------------
def last_valid_index(valid_mask: torch.Tensor) -> torch.Tensor:
    """valid_mask (B, N) bool -> (B,) index of each row's last True."""
    positions = torch.arange(valid_mask.shape[1], device=valid_mask.device)
    return torch.where(valid_mask, positions, -1).max(dim=1).values


def attention_rows_from_qk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of some query rows over all keys, causal by sequence index, in float32.

    queries: (B, H, Q, D) the rows' queries (RoPE applied); keys: (B, Hkv, N, D) (RoPE applied, H a multiple
    of Hkv); query_index: (B, Q) the rows' sequence indices; key_valid: (B, N) bool (padding False).
    -> (B, H, Q, N); masked keys get exactly 0.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scaling
    positions = torch.arange(keys.shape[2], device=keys.device)
    allowed = (positions.view(1, 1, -1) <= query_index.unsqueeze(-1)) & key_valid.unsqueeze(1)  # (B, Q, N)
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def top_visual(scores: torch.Tensor, visual_mask: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep mask of each sample's ``counts`` highest-scoring visual tokens.

    scores: (B, N); visual_mask: (B, N) bool; counts: (B,) long (<= visual tokens of that sample) -> (B, N) bool.
    """
    masked = scores.float().masked_fill(~visual_mask, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < counts.unsqueeze(1)) & visual_mask


@dataclass
class Selection:
    """A selection that also inserts tokens (SparseVLM's recycled clusters): ``keep`` (B, N) bool over the
    current sequence; ``extra`` (B, K, C) new tokens, ``extra_valid`` (B, K) bool, inserted right after
    position ``insert_after`` (B,) of the current sequence, in order. Inserted tokens count as visual."""

    keep: torch.Tensor
    extra: torch.Tensor
    extra_valid: torch.Tensor
    insert_after: torch.Tensor


def insert_and_drop(keep: torch.Tensor, extra_valid: torch.Tensor, insert_after: torch.Tensor) -> Dropped:
    """Like ``drop_tokens`` over the current sequence (B, N) followed by K inserted tokens (B, K) that go
    right after ``insert_after`` (B,): indices into the concatenation (B, N + K), left-padded."""
    batch, length = keep.shape
    count = extra_valid.shape[1]
    order_key = torch.arange(length, device=keep.device, dtype=torch.float64).expand(batch, -1)
    # strictly between position insert_after and the next one, in order
    extra_key = insert_after.double().unsqueeze(1) + (torch.arange(count, device=keep.device) + 1.0) / (count + 1)
    kept = torch.cat([keep, extra_valid], dim=1)
    order_key = torch.where(kept, torch.cat([order_key, extra_key], dim=1), -1.0)
    size = int(kept.sum(dim=1).max())
    index = order_key.argsort(dim=1, stable=True)[:, length + count - size :]
    return Dropped(index, kept.gather(1, index))


@dataclass
class Dropped:
    """The sequence after a drop. index: (B, M) positions of the kept tokens in the sequence before the drop,
    right-aligned (left padding); valid: (B, M) bool, False on the padding slots (whose index is arbitrary)."""

    index: torch.Tensor
    valid: torch.Tensor

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, ...) -> (B, M, ...)."""
        index = self.index
        if x.dim() > 2:
            index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)


def drop_tokens(keep: torch.Tensor) -> Dropped:
    """keep (B, N) bool -> the kept positions of each sample in order, left-padded to the longest (B, M)."""
    length = int(keep.sum(dim=1).max())
    # a stable sort puts each row's dropped positions first and its kept ones last, both in order
    order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices
    index = order[:, keep.shape[1] - length :]
    return Dropped(index, keep.gather(1, index))


def compact_positions(position_ids: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions after dropping with renumbering: each token's position minus the valid tokens dropped
    before it. position_ids, keep, valid: (B, N) -> (B, N) (meaningful where kept)."""
    dropped = (valid & ~keep).long().cumsum(dim=1)
    return position_ids - dropped


@dataclass
class PrunedGroup:
    """Layers ``start`` .. (next group's start - 1) cache only some prefix tokens.

    kept_index: (B, M) indices into the prefix (the first ``PrunedPrefix.prefix_length`` tokens of the
    caller's sequence); kept_valid: (B, M) bool; position_shift: (B,) long, subtracted from the caller's
    position ids of every later token (0 when positions are kept)."""

    start: int
    kept_index: torch.Tensor
    kept_valid: torch.Tensor
    position_shift: torch.Tensor

    def key_mask(self, attention_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
        """The caller's 2D mask (B, prefix_length + later) -> this group's (B, M + later) bool."""
        attention_mask = attention_mask.bool()
        prefix = attention_mask[:, :prefix_length].gather(1, self.kept_index) & self.kept_valid
        return torch.cat([prefix, attention_mask[:, prefix_length:]], dim=1)


@dataclass
class PrunedPrefix:
    """What a pruned prefill left in a KV cache: the prefix length in the caller's index space and, per
    group of layers after a drop, the tokens they hold (``PrunedGroup``), ordered by ``start``."""

    prefix_length: int
    groups: list[PrunedGroup] = field(default_factory=list)

    def group_of(self, layer: int) -> PrunedGroup | None:
        found = None
        for group in self.groups:
            if group.start <= layer:
                found = group
        return found

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for group in self.groups:
            group.kept_index = group.kept_index.index_select(0, beam_idx)
            group.kept_valid = group.kept_valid.index_select(0, beam_idx)
            group.position_shift = group.position_shift.index_select(0, beam_idx)


def check_pruner_layers(name: str, layers, num_layers: int) -> tuple[int, ...]:
    """Drop layers must be ascending, distinct, in [1, num_layers - 1]: ValueError naming value and limit."""
    layers = tuple(layers)
    if not layers:
        raise ValueError(f"{name}: at least one pruning layer is needed")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{name}: layer {layer!r} is not an integer")
        if not 1 <= layer <= num_layers - 1:
            raise ValueError(
                f"{name}: layer {layer} is outside [1, {num_layers - 1}] for an LLM of {num_layers} decoder layers "
                "(tokens are dropped before that layer; layer 0 has no attention to rank them by)"
            )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{name}: layers must be strictly ascending, got {list(layers)}")
    return layers
