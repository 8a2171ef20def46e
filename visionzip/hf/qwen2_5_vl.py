"""``transformers.Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL): VisionZip on the merged tokens.

Where compression acts (docs/models.md, "Qwen2.5-VL"): on the **merged** tokens, after the 2 x 2 patch
merger, as the official port does (dvlab-research/VisionZip at 68993a3, ``Qwen2_5_VL/qwen2_5vl_visionzip.py``;
the community VisionZip-Qwen2VL discussion #3 prunes before the merger instead). A merged token is what
the LLM sees, so the budget counts LLM tokens, and the merger still sees complete 2 x 2 units.

- Scores: the **last** vision block's attention (a full-attention block in the released checkpoints),
  recomputed from that block's q and k (captured by a forward pre-hook on its attention module; the tower
  itself keeps its SDPA kernels), over the sequences that block attends (``cu_seqlens``: one image), mean
  over heads, summed over queries (attention each patch receives), averaged over the 4 patches of each
  merge unit, and put from the tower's window order back to raster order.
- Merge metric: that block's keys (after RoPE) averaged over the 4 patches of each unit, then over heads.
- Per image: the top ``dominant`` merged tokens; the other R tokens are split into ``contextual`` uniformly
  spaced targets (step ``max(1, R // contextual)``) and the rest; each rest token joins its most
  key-similar target; a contextual token = target + mean(joined), written at the target's place. The kept
  tokens (dominant and contextual) stay in raster order: ``dominant + contextual`` features per image.
- Positions: each kept token keeps its original M-RoPE (t, h, w) position, and the text after an image keeps
  its original position too (an image advances M-RoPE by max(h, w) / merge, not by its token count). The
  kept positions depend on the image, so they are computed in the model: the pre-hook of the inner model
  encodes the images (or takes generate()'s pre-encoded ones), and replaces ``position_ids`` with the
  uncompressed layout's positions (``get_vision_position_ids``) restricted to the kept tokens
  (``kept_positions``). ``get_rope_index`` is shadowed on the instance for the compressed layout, because
  generate() asks it for positions before it encodes the images: its text rows are the final ones (so the
  decoding positions that generate() continues from them are right), its image rows are filled in by the
  pre-hook.

Budgets: ``visionzip:dominant=D,contextual=C`` per image; ``visionzip:TOKENS`` is VisionZip's own split
(``VisionZip.from_budget``: 64 -> 54 + 10). The official port instead keeps ``int(0.65 n)`` dominant and
``max(int(0.05 n), 1)`` contextual of an image's n merged tokens (``official_ratio_counts``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from ..methods.base import complement_indices
from ..methods.visionzip import VisionZip, merge_contextual
from ..scoring import received_attention
from .base import HFFamily, Modality, register_family, vision_settings

# the official port's budget: fractions of an image's merged tokens (dominant, contextual)
OFFICIAL_DOMINANT_RATIO, OFFICIAL_CONTEXTUAL_RATIO = 0.65, 0.05


def official_ratio_counts(num_merged: int) -> tuple[int, int]:
    """The official port's (dominant, contextual) for an image of ``num_merged`` merged tokens."""
    return int(OFFICIAL_DOMINANT_RATIO * num_merged), max(int(OFFICIAL_CONTEXTUAL_RATIO * num_merged), 1)


@dataclass
class Qwen2_5_VLCompressedOutput(BaseModelOutputWithPooling):
    """The compressed ``get_image_features``: ``pooler_output`` one (K_i, hidden) tensor per image;
    ``keep_indices`` one (K_i,) tensor per image: the raster indices (among that image's merged tokens) of
    the kept tokens, ascending, in the order of ``pooler_output``; ``image_grid_thw`` (num_images, 3).
    ``image_tokens``: the per-image tensors as encoded; generate() repeats ``pooler_output``'s entries for
    beams / several sequences per prompt (the same tensor objects), ``per_image`` follows them."""

    keep_indices: tuple[torch.Tensor, ...] | None = None
    image_grid_thw: torch.Tensor | None = None
    image_tokens: tuple[torch.Tensor, ...] | None = None

    def per_image(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(keep indices, grid rows) for each entry of ``pooler_output``, in its order."""
        index = [next(i for i, tokens in enumerate(self.image_tokens) if tokens is entry) for entry in self.pooler_output]
        return [self.keep_indices[i] for i in index], self.image_grid_thw[index]


def _settings(config) -> VisionZip:
    settings = vision_settings(config)
    if not isinstance(settings, VisionZip):
        raise ValueError(
            f"the Qwen2.5-VL adapter compresses with VisionZip on the merged tokens (as the official port); "
            f"{settings.name} is not adapted to Qwen2.5-VL's window-attention tower"
        )
    return settings


def merge_unit(model) -> int:
    return model.config.vision_config.spatial_merge_size ** 2


def merged_counts(model, image_grid_thw) -> list[int]:
    """Merged tokens per image: t * h * w / merge^2."""
    return [int(t * h * w) // merge_unit(model) for t, h, w in torch.as_tensor(image_grid_thw).tolist()]


def check_budget(settings: VisionZip, counts: list[int]) -> None:
    """ValueError naming the budget and the smallest image's merged tokens when the budget exceeds it."""
    total = settings.dominant + settings.contextual
    for index, count in enumerate(counts):
        if total > count:
            raise ValueError(
                f"dominant + contextual = {total} exceeds the {count} merged tokens of image {index}; "
                f"use at most {count} tokens per image for these images"
            )


def check(model, config) -> None:
    """At apply time only the method can be checked: the budget limit depends on each image's size."""
    _settings(config)


# ----- the vision side ----------------------------------------------------------------------------------
def block_queries_keys(attn, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k of a vision attention module as it computes them (RoPE applied): (N, C) -> (H, N, d) each."""
    n = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q.transpose(0, 1), k.transpose(0, 1)


def unit_scores_and_keys(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, unit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merge unit, in the tower's (window) order: the attention its patches receive (mean over heads,
    summed over the queries of the sequence the block attends, mean over the unit's patches), (N / unit,),
    and the keys averaged over the unit's patches then over heads, (N / unit, d).

    q, k: (H, N, d) of the scored block; cu_seqlens: (S + 1,) the sequences it attends."""
    bounds = cu_seqlens.tolist()
    received = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # received_attention averages over queries: times the sequence length = the sum over queries
        received.append(received_attention(q[None, :, start:end], k[None, :, start:end], scale)[0] * (end - start))
    scores = torch.cat(received).view(-1, unit).mean(dim=-1)
    heads, n, dim = k.shape
    keys = k.reshape(heads, n // unit, unit, dim).mean(dim=2).mean(dim=0)
    return scores, keys


def select_and_merge(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's merged tokens, raster order: features (n, hidden), scores (n,), keys (n, d) ->
    kept tokens (dominant + contextual, hidden) in raster order with each contextual token at its target's
    place, and their raster indices (dominant + contextual,) ascending."""
    n = features.shape[0]
    top = scores.topk(dominant).indices.sort().values[None]  # (1, D)
    remaining = complement_indices(top, n)[0]  # (R,) ascending
    merged, targets, _ = merge_contextual(features[remaining][None], keys[remaining][None], contextual)
    target_index = remaining[targets]
    keep = torch.cat([top[0], target_index]).sort().values
    tokens = features.clone()
    tokens[target_index] = merged[0].to(tokens.dtype)
    return tokens[keep], keep


def image_features(model, config, pixel_values, image_grid_thw=None, **kwargs) -> Qwen2_5_VLCompressedOutput:
    """Compressed ``get_image_features``: pixel_values (sum of t*h*w patches, C*T*P*P), image_grid_thw
    (num_images, 3) -> ``Qwen2_5_VLCompressedOutput``. All images go through the tower in one pass; the
    selection is per image."""
    if image_grid_thw is None:
        raise ValueError("Qwen2.5-VL needs image_grid_thw (t, h, w) per image")
    settings = _settings(config)
    counts = merged_counts(model, image_grid_thw)
    check_budget(settings, counts)
    visual = model.model.visual
    attn = visual.blocks[-1].attn
    captured: dict = {}

    def capture(module, args, block_kwargs):
        captured["hidden"] = block_kwargs.get("hidden_states", args[0] if args else None)
        captured["cu_seqlens"] = block_kwargs["cu_seqlens"]
        captured["position_embeddings"] = block_kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        encoded = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw)
    finally:
        handle.remove()
    unit = merge_unit(model)
    with torch.no_grad():
        q, k = block_queries_keys(attn, captured["hidden"], captured["position_embeddings"])
        scores, keys = unit_scores_and_keys(q, k, captured["cu_seqlens"], attn.scaling, unit)
        window_index, _ = get_vision_window_index(
            image_grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        raster = torch.argsort(window_index.to(scores.device))
        scores, keys = scores[raster], keys[raster]
    tokens, kept, start = [], [], 0
    for count in counts:
        part = slice(start, start + count)
        start += count
        image_tokens, keep = select_and_merge(
            encoded.pooler_output[part], scores[part], keys[part], settings.dominant, settings.contextual
        )
        tokens.append(image_tokens)
        kept.append(keep)
    return Qwen2_5_VLCompressedOutput(
        last_hidden_state=encoded.last_hidden_state, pooler_output=tuple(tokens), keep_indices=tuple(kept),
        image_grid_thw=torch.as_tensor(image_grid_thw), image_tokens=tuple(tokens),
    )


def placeholder_counts(model, settings, image_inputs) -> list[int]:
    counts = merged_counts(model, image_inputs["image_grid_thw"])
    check_budget(settings, counts)
    return [settings.dominant + settings.contextual] * len(counts)


def expected_count(model, settings, kwargs) -> int:
    grid = kwargs.get("image_grid_thw")
    if grid is None:
        raise ValueError("Qwen2.5-VL needs image_grid_thw (t, h, w) per image")
    return sum(placeholder_counts(model, settings, {"image_grid_thw": grid}))


# ----- the LLM side: positions ---------------------------------------------------------------------------
def token_types(model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """text 0, image 1, video 2 per token (the processor's ``mm_token_type_ids``, else from the ids)."""
    if mm_token_type_ids is not None:
        return mm_token_type_ids
    types = torch.zeros_like(input_ids)
    types[input_ids == model.config.image_token_id] = 1
    types[input_ids == model.config.video_token_id] = 2
    return types


def kept_positions(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    keep_indices=None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions (3, B, L) of a compressed layout and the rope deltas (B, 1), as transformers'
    ``get_rope_index`` computes them for the uncompressed layout, restricted to the kept image tokens.

    input_ids (B, L) hold K_i placeholders for image i; ``keep_indices``: one (K_i,) tensor of raster
    indices per image, in the order the images appear (row by row). ``keep_indices=None``: the kept tokens
    are not known yet (generate() asks before it encodes the images); text rows are final, image rows hold
    the image's first position until the forward fills them in. Videos are not compressed. Padding
    (``attention_mask`` 0) gets position 0, as in transformers."""
    inner = model.model
    merge = model.config.vision_config.spatial_merge_size
    tokens_per_second = model.config.vision_config.tokens_per_second
    images = iter(image_grid_thw if image_grid_thw is not None else [])
    videos = iter(video_grid_thw if video_grid_thw is not None else [])
    kept = iter(keep_indices) if keep_indices is not None else None
    seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else [])
    types = token_types(model, input_ids, mm_token_type_ids)
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    deltas = []
    for row in range(input_ids.shape[0]):
        valid = attention_mask[row].bool() if attention_mask is not None else torch.ones_like(input_ids[row], dtype=torch.bool)
        parts, current = [], 0
        for kind, group in itertools.groupby(types[row][valid].tolist()):
            length = len(list(group))
            if kind == 0:
                parts.append(torch.arange(current, current + length, device=input_ids.device).expand(3, -1))
                current += length
                continue
            grid = next(images) if kind == 1 else next(videos)
            interval = 1 if kind == 1 else tokens_per_second * float(next(seconds, 1.0))
            full = inner.get_vision_position_ids(current, grid, 1, merge, interval, device=input_ids.device)
            if kind == 1 and kept is not None:
                full = full[:, next(kept).to(input_ids.device)]
            elif kind == 1 and length != full.shape[1]:
                full = full[:, :1].expand(3, length)  # filled in by the forward once the kept tokens are known
            if full.shape[1] != length:
                raise ValueError(
                    f"row {row}: a run of {length} {'image' if kind == 1 else 'video'} placeholder tokens, but its "
                    f"grid {torch.as_tensor(grid).tolist()} gives {full.shape[1]} features"
                )
            parts.append(full)
            current += max(int(grid[1]), int(grid[2])) // merge
        positions[:, row, valid] = torch.cat(parts, dim=1)
        # as get_rope_index: the next position minus the row's length (the image advances by its grid)
        deltas.append(current - int(valid.sum()))
    return positions, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def rope_index(model):
    """``get_rope_index`` of the compressed layout (an instance method of the inner model, see the module
    docstring): the same arguments and results as transformers'."""

    def get_rope_index(
        input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
        attention_mask=None, **kwargs,
    ):
        return kept_positions(
            model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, None, video_grid_thw, second_per_grid_ts
        )

    return {"get_rope_index": get_rope_index}


def prepare(model, config, kwargs: dict) -> dict:
    """Forward pre-hook (after the placeholder check): when the forward holds image placeholders, encode the
    images (unless generate() did), and give the LLM the kept tokens' original positions."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and kwargs.get("pixel_values") is not None:
        raise ValueError(
            "compressed Qwen2.5-VL needs input_ids with the pixel_values (the kept tokens' positions are computed "
            "from the placeholders), not inputs_embeds"
        )
    if input_ids is None or not bool((input_ids == model.config.image_token_id).any()):
        return kwargs
    inner = model.model
    encoders = dict(kwargs.get("mm_encoder_outputs") or {})
    if kwargs.get("pixel_values") is not None:
        encoders["image"] = inner.get_image_features(kwargs["pixel_values"], kwargs.get("image_grid_thw"))
        kwargs = {**kwargs, "pixel_values": None, "mm_encoder_outputs": encoders}
    encoded = encoders.get("image")
    if not isinstance(encoded, Qwen2_5_VLCompressedOutput):
        return kwargs
    attention_mask = kwargs.get("attention_mask")
    keep_indices, grids = encoded.per_image()
    positions, deltas = kept_positions(
        model, input_ids, attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None,
        kwargs.get("mm_token_type_ids"), grids, keep_indices, kwargs.get("video_grid_thw"),
        kwargs.get("second_per_grid_ts"),
    )
    given = kwargs.get("position_ids")
    if given is not None and given.dim() == 3 and given.shape[0] == 4:
        positions = torch.cat([given[:1], positions.to(given.dtype)])  # keep generate()'s text-position row
    inner.rope_deltas = deltas  # as the model's own prefill: later steps without position_ids continue from it
    return {**kwargs, "position_ids": positions}


FAMILY = register_family(
    HFFamily(
        name="qwen2_5_vl",
        class_names=("Qwen2_5_VLForConditionalGeneration",),
        check=check,
        modalities=(Modality("image", image_features, placeholder_counts, expected_count),),
        methods=lambda model, config: rope_index(model),
        prepare=prepare,
    )
)
