"""``transformers.Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL): encoder-output methods on the merged tokens.

Where compression acts (docs/models.md, "Qwen2.5-VL"): on the **merged** tokens, after the 2 x 2 patch
merger, as the official port does (dvlab-research/VisionZip at 68993a3, ``Qwen2_5_VL/qwen2_5vl_visionzip.py``;
the community VisionZip-Qwen2VL discussion #3 prunes before the merger instead). A merged token is what
the LLM sees, so the budget counts LLM tokens, and the merger still sees complete 2 x 2 units.

The methods see each image as ``Qwen2_5_VLUnits``: its merged tokens in raster order, no CLS position; every
encoder-output method compresses that view with its own ``compress`` (VisionZip, VisPruner, pooling, random),
and its ``check`` runs on each image's view before the tower (budgets depend on the image's size). Methods
acting inside the tower (stage ``tower``) are refused: the tower runs all images as one window-ordered
sequence into the merger, which this view cannot run layer by layer.

- Scores (the view's ``received_attention``, for methods scoring by received attention): the **last** vision block's attention (a full-attention block in the released checkpoints),
  recomputed from that block's q and k (captured by a forward pre-hook on its attention module; the tower
  itself keeps its SDPA kernels), over the sequences that block attends (``cu_seqlens``: one image), mean
  over heads, summed over queries (attention each patch receives), averaged over the 4 patches of each
  merge unit, and put from the tower's window order back to raster order.
- Keys (the view's ``queries_keys``; VisionZip's merge metric is their head mean): that block's keys (after
  RoPE) averaged over the 4 patches of each unit.
- VisionZip, per image (the official port's computation): the top ``dominant`` merged tokens; the other R tokens are split into ``contextual`` uniformly
  spaced targets (step ``max(1, R // contextual)``) and the rest; each rest token joins its most
  key-similar target; a contextual token = target + mean(joined), written at the target's place. The kept
  tokens (dominant and contextual) stay in raster order: ``dominant + contextual`` features per image.
- Every output token has one raster index: kept tokens their own, merged tokens their method's
  representative (``CompressedTokens.merged_indices``: VisionZip's contextual targets), or, without one
  (pooling), evenly spread indices (``spread_positions``; our rule). Output in raster order of these.
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
(``VisionZip.from_budget``: 64 -> 54 + 10); other methods ``METHOD:TOKENS`` per image. The official port instead keeps ``int(0.65 n)`` dominant and
``max(int(0.05 n), 1)`` contextual of an image's n merged tokens (``official_ratio_counts``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from ..encoders import EncoderCapture, VisionEncoderAdapter
from ..scoring import received_attention
from .base import HFFamily, Modality, fixed_count, register_family, vision_settings

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


def merge_unit(model) -> int:
    return model.config.vision_config.spatial_merge_size ** 2


def merged_counts(model, image_grid_thw) -> list[int]:
    """Merged tokens per image: t * h * w / merge^2."""
    return [int(t * h * w) // merge_unit(model) for t, h, w in torch.as_tensor(image_grid_thw).tolist()]


# ----- the vision side: one image's merged tokens as a sequence the methods compress -------------------
def block_queries_keys(attn, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k of a vision attention module as it computes them (RoPE applied): (N, C) -> (H, N, d) each."""
    n = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q.transpose(0, 1), k.transpose(0, 1)


class Qwen2_5_VLUnits(VisionEncoderAdapter):
    """One image of Qwen2.5-VL seen as its merged tokens (module docstring): a sequence of U = t h w / 4
    tokens in raster order over the (h / 2, w / 2) grid, no CLS, the merger's output as features.

    Built from the tower pass of all images (``from_pass``): the image's features (U, hidden), the last
    block's q and k over the image's patches (H, 4U, d) in the tower's window order (four patches of a
    unit adjacent), the bounds of the sequences that block attends within the image, and each raster
    unit's index in window order. ``queries_keys`` hands the methods the patch queries and the unit keys
    (raster order, each the mean of its four patches' keys): VisionZip's merge metric, as the official
    port. ``received_attention`` scores a unit by the attention its four patches receive in the block's
    own attention (softmax over the patches of each attended sequence, mean over heads, summed over the
    queries, mean over the four patches), as the official port. Built from a grid alone (``queries``
    None), it gives the geometry the methods' ``check`` needs before the tower runs.

    The tower runs every image in one window-ordered pass into the 2 x 2 merger: this view cannot run it
    layer by layer (``run``), so methods that act inside the tower (stage ``tower``) are refused."""

    has_cls = False
    family = "qwen2_5_vl"

    def __init__(self, visual, grid_thw, image: int = 0, features=None, queries=None, keys=None, bounds=None,
                 unit_order=None):
        self.model = visual
        self.core = visual
        self.layers = visual.blocks
        self.config = visual.config
        self.image = image
        self.grid = [int(x) for x in torch.as_tensor(grid_thw).tolist()]
        self.merge = int(visual.spatial_merge_size)
        self.features, self.queries, self.keys, self.bounds, self.unit_order = features, queries, keys, bounds, unit_order

    @classmethod
    def from_pass(cls, visual, image_grid_thw, features, queries, keys, cu_seqlens, window_index) -> list:
        """One view per image from a tower pass over all images: features (U_total, hidden) raster order;
        queries, keys (H, N, d) of the last block, window order; cu_seqlens (S + 1,) the sequences it
        attends; window_index (U_total,) the window order of the raster units."""
        unit = int(visual.spatial_merge_size) ** 2
        raster = torch.argsort(window_index.to(features.device))  # raster unit -> its place in window order
        bounds = cu_seqlens.tolist()
        views, start = [], 0
        for image, grid in enumerate(torch.as_tensor(image_grid_thw).tolist()):
            count = int(grid[0] * grid[1] * grid[2]) // unit
            first, last = start * unit, (start + count) * unit  # the image's patches (window order)
            local = [b - first for b in bounds if first <= b <= last]
            views.append(cls(
                visual, grid, image, features[start : start + count], queries[:, first:last], keys[:, first:last],
                local, raster[start : start + count] - start,
            ))
            start += count
        return views

    # ----- geometry ---------------------------------------------------------------------------------
    @property
    def unit_rows(self) -> int:
        return self.grid[1] // self.merge

    @property
    def unit_cols(self) -> int:
        return self.grid[2] // self.merge

    @property
    def num_patches(self) -> int:
        """Merged tokens of the image (the sequence the methods compress)."""
        return self.grid[0] * self.unit_rows * self.unit_cols

    @property
    def num_tokens(self) -> int:
        return self.num_patches

    @property
    def patches_per_side(self) -> int:
        if self.grid[0] != 1 or self.unit_rows != self.unit_cols:
            raise ValueError(
                f"its merged tokens lie on a {self.unit_rows} x {self.unit_cols} grid "
                f"({self.grid[0]} temporal step(s)), not a square one; a method that lays the tokens on a square "
                "side needs a square image"
            )
        return self.unit_rows

    @property
    def image_size(self) -> int:
        return self.patches_per_side * self.patch_size

    @property
    def patch_size(self) -> int:
        """Pixels per side of a merged token."""
        return int(self.config.patch_size) * self.merge

    @property
    def hidden_size(self) -> int:
        return int(self.config.out_hidden_size)

    # ----- running ----------------------------------------------------------------------------------
    def run(self, pixel_values, select_layer: int = -1, capture_attn_input: bool = True, early_exit: bool = True):
        raise ValueError(
            "Qwen2.5-VL's tower runs all images as one window-ordered sequence into the 2 x 2 merger; "
            f"{type(self).__name__} hands each image's merged tokens to a method's compress and cannot run "
            "the tower layer by layer"
        )

    def queries_keys(self, layer_index: int, attn_input=None, query_rows: slice | None = None):
        """The last block's q over the image's patches (1, H, 4U, d) (window order; ``query_rows`` of
        them), its keys pooled to units (1, H, U, d) (raster order) and the softmax scale. The block's q
        and k were computed once for the whole tower pass (``from_pass``); only the last block is scored."""
        if self.queries is None:
            raise ValueError(f"{type(self).__name__} built from a grid alone holds no tower pass")
        if layer_index != self.num_layers - 1:
            raise ValueError(
                f"Qwen2.5-VL's merged tokens are scored with the last vision block ({self.num_layers - 1}), "
                f"not block {layer_index}"
            )
        heads, n, dim = self.keys.shape
        unit_keys = self.keys.reshape(heads, n // self.merge**2, self.merge**2, dim).mean(dim=2)[:, self.unit_order]
        q = self.queries if query_rows is None else self.queries[:, query_rows]
        return q[None], unit_keys[None], self.attention_scale(layer_index)

    def attention_scale(self, layer_index: int) -> float:
        """The softmax scale of block ``layer_index``'s attention (transformers' module names)."""
        return float(self.layers[layer_index].attn.scaling)

    def received_attention(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """(1, U) per unit, raster order: the attention its patches receive in the last block (softmax over
        the patches of each sequence the block attends, mean over heads, summed over that sequence's
        queries), mean over the unit's patches. q: (1, H, 4U, d) the patch queries from ``queries_keys``;
        the patch keys are this view's (``k`` holds the unit keys)."""
        received = []
        for start, end in zip(self.bounds[:-1], self.bounds[1:]):
            # received_attention averages over queries: times the sequence length = the sum over queries
            part = received_attention(q[:, :, start:end], self.keys[None, :, start:end], scale)[0] * (end - start)
            received.append(part)
        scores = torch.cat(received).view(-1, self.merge**2).mean(dim=-1)
        return scores[self.unit_order][None]


def _views(model, image_grid_thw) -> list[Qwen2_5_VLUnits]:
    return [Qwen2_5_VLUnits(model.model.visual, grid, i) for i, grid in enumerate(torch.as_tensor(image_grid_thw).tolist())]


def check_images(model, settings, image_grid_thw) -> list[int]:
    """The method's own ``check`` against each image's merged tokens (a ValueError naming the image and its
    count); returns the placeholder count of each image."""
    counts = []
    for view in _views(model, image_grid_thw):
        try:
            settings.check(view, -1)
            counts.append(fixed_count(settings, view.num_tokens))
        except ValueError as err:
            raise ValueError(f"image {view.image} ({view.num_tokens} merged tokens): {err}") from err
    return counts


def check(model, config) -> None:
    """At apply time: the stage (the budget limit depends on each image's size, checked per image)."""
    settings = vision_settings(config)
    if settings.stage == "tower":
        raise ValueError(
            f"{settings.name} acts inside the vision tower (stage 'tower'); Qwen2.5-VL's tower runs all images as "
            "one window-ordered sequence into the 2 x 2 merger, which Qwen2_5_VLUnits cannot run layer by layer: "
            "use an encoder_output method"
        )


def spread_positions(count: int, total: int, device=None) -> torch.Tensor:
    """(count,) raster indices evenly spread over ``total`` tokens: where merged tokens that have no
    position of their own (pooling) are placed."""
    return (torch.arange(count, device=device) * 2 + 1) * total // (2 * count)


def compress_units(settings, views: list[Qwen2_5_VLUnits]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The method's ``compress`` on each image's merged tokens: per image the kept tokens (K_i, hidden) and
    their raster indices (K_i,), ascending (module docstring: every output token has one raster index).
    Shared with the vLLM plugin (``visionzip.vllm.qwen2_5_vl``), whose views are built from vLLM's tower."""
    tokens, kept = [], []
    for view in views:
        compressed = settings.compress(view, EncoderCapture(view.features[None], None, view.num_layers - 1))
        places = compressed.keep_indices[0]
        if compressed.num_merged:
            merged = compressed.merged_indices
            merged = spread_positions(compressed.num_merged, view.num_tokens, places.device) if merged is None else merged[0]
            places = torch.cat([places, merged.to(places.device)])
        order = torch.sort(places, stable=True)
        tokens.append(compressed.tokens[0][order.indices])
        kept.append(order.values)
    return tokens, kept


def image_features(model, config, pixel_values, image_grid_thw=None, **kwargs) -> Qwen2_5_VLCompressedOutput:
    """Compressed ``get_image_features``: pixel_values (sum of t*h*w patches, C*T*P*P), image_grid_thw
    (num_images, 3) -> ``Qwen2_5_VLCompressedOutput``. All images go through the tower in one pass; the
    method compresses each image's merged tokens on their own (``Qwen2_5_VLUnits``)."""
    if image_grid_thw is None:
        raise ValueError("Qwen2.5-VL needs image_grid_thw (t, h, w) per image")
    settings = vision_settings(config)
    check_images(model, settings, image_grid_thw)
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
    with torch.no_grad():
        q, k = block_queries_keys(attn, captured["hidden"], captured["position_embeddings"])
        window_index, _ = get_vision_window_index(
            image_grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
    views = Qwen2_5_VLUnits.from_pass(
        visual, image_grid_thw, encoded.pooler_output, q, k, captured["cu_seqlens"], window_index
    )
    tokens, kept = compress_units(settings, views)
    return Qwen2_5_VLCompressedOutput(
        last_hidden_state=encoded.last_hidden_state, pooler_output=tuple(tokens), keep_indices=tuple(kept),
        image_grid_thw=torch.as_tensor(image_grid_thw), image_tokens=tuple(tokens),
    )


def placeholder_counts(model, settings, image_inputs) -> list[int]:
    return check_images(model, settings, image_inputs["image_grid_thw"])


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
