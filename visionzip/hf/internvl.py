"""``transformers.InternVLForConditionalGeneration`` (InternVL 2.5 / 3 ``-hf`` checkpoints): InternViT,
pixel shuffle, an MLP projector; images split into tiles (plus a thumbnail).

The HF model's image features for a tile are: InternViT's ``hidden_states[vision_feature_layer]``
(``vision_feature_layer=-1``: ``last_hidden_state``), CLS dropped (``vision_feature_select_strategy=
"default"``), the (S, S) patch grid pixel-shuffled with ``downsample_ratio`` 0.5 (each 2 x 2 unit of
patches becomes one token of 4x the width), then ``multi_modal_projector``: (S / 2)^2 tokens per tile
(256 for 448-pixel tiles of 14-pixel patches).

Where compression acts: on the pixel-shuffled units, between the shuffle and the projector. The shuffle
needs the full patch grid (a pruned patch sequence has no 2 x 2 units left), and the projector was trained
on whole units only, so the tokens a method keeps or merges are units: ``InternViTUnits`` presents the
scored layer to the methods as a sequence of (S / 2)^2 unit tokens of width 4C, in the shuffle's own
order (row-major over the unit grid), and the projector maps the kept ones. The budget is per tile, at
most (S / 2)^2 (a ValueError at apply time otherwise). Every tile (and the thumbnail, and a video frame)
is a view compressed on its own; an image of n tiles becomes ``n * tokens_per_view`` features.

Scoring (docs/models.md): InternViT's embeddings always prepend a CLS token, present at every layer;
HF InternVL drops it only after the tower, so the CLS is not an LLM token and cannot enter the 4C-wide
projector. The unit view therefore has no CLS position (``has_cls=False``), and its attention is
recomputed from the scored layer's own q and k (``q_proj`` / ``k_proj`` followed by the layer's
``q_norm`` / ``k_norm``, the qk-norm of InternViT-6B; identities on InternViT-300M): a unit's key is the
mean of its four patches' keys (so its attention logit is the mean of theirs), and the scoring query is
the CLS query. A method's received-attention score (appendix A.2 form, the mean over the given queries
and the heads) is then the CLS attention over the units, mean over heads; a tower without CLS would give
the units' mean queries instead (appendix A.2 proper). VisionZip's merge metric is the head mean of the
unit keys: the keys averaged over the unit, then over heads, as the official VisionZip Qwen2.5-VL port
does for its 2 x 2 merge units. Tower-stage methods (ToMe) merge patches inside InternViT, which leaves
no patch grid to shuffle: refused at apply time.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..encoders import EncoderCapture, VisionEncoderAdapter
from ..pipeline import encode_views, placeholder_count, project
from .base import HFFamily, Modality, fixed_count, register_family, single_layer, vision_settings


def _side(value) -> int:
    """A square size from an int or an (h, w) pair; InternVL tiles are square."""
    if isinstance(value, (list, tuple)):
        if value[0] != value[1]:
            raise ValueError(f"InternVL tiles are square; got a size of {tuple(value)}")
        return int(value[0])
    return int(value)


class InternViTUnits(VisionEncoderAdapter):
    """InternViT seen as a sequence of pixel-shuffle units (module docstring): ``run`` captures the scored
    layer and returns its units (B, U, C * f^2) as ``hidden`` and the layer's attention input (B, 1 + P, C)
    as ``attn_input``; ``queries_keys`` recomputes that layer's q and k and pools them to units.

    inner: the ``InternVLModel`` (its ``vision_tower``, ``pixel_shuffle`` and ``config.downsample_ratio``).
    """

    has_cls = False  # the unit sequence; the tower's own CLS scores the units (``tower_has_cls``)
    family = "internvit"

    def __init__(self, inner):
        self.inner = inner
        self.model = inner.vision_tower
        self.core = self.model
        self.layers = self.model.encoder.layer
        self.config = self.model.config
        ratio = float(inner.config.downsample_ratio)
        self.factor = round(1 / ratio)
        if self.factor < 1 or abs(self.factor * ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio={ratio}: the pixel shuffle needs 1 / downsample_ratio to be an integer")
        self.ratio = ratio
        self.tower_has_cls = getattr(self.model.embeddings, "cls_token", None) is not None
        if self.patch_side % self.factor:
            raise ValueError(
                f"a {self.patch_side} x {self.patch_side} patch grid does not split into {self.factor} x {self.factor} "
                "pixel-shuffle units"
            )

    # ----- geometry: tiles of patch_side^2 patches, (patch_side / f)^2 units -----------------------
    @property
    def image_size(self) -> int:
        return _side(self.config.image_size)

    @property
    def patch_side(self) -> int:
        """Patches per side of a tile (before the shuffle)."""
        return self.image_size // _side(self.config.patch_size)

    @property
    def patch_size(self) -> int:
        """Pixels per side of a unit (f x f patches)."""
        return _side(self.config.patch_size) * self.factor

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size) * self.factor**2

    def unit_members(self, device=None) -> torch.Tensor:
        """(U, f^2) the patch indices (0-based, CLS excluded) each unit holds, in the unit's channel
        order: the model's own ``pixel_shuffle`` applied to a grid of patch indices."""
        side = self.patch_side
        grid = torch.arange(side * side, dtype=torch.float64, device=device).reshape(1, side, side, 1)
        shuffled = self.inner.pixel_shuffle(grid, scale_factor=self.ratio)
        return shuffled.reshape(-1, self.factor**2).round().long()

    def shuffle(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, C) patch tokens in grid order -> (B, U, C * f^2) units, as HF InternVL's feature path."""
        bsz, _, channels = patches.shape
        grid = patches.reshape(bsz, self.patch_side, self.patch_side, channels)
        return self.inner.pixel_shuffle(grid, scale_factor=self.ratio).reshape(bsz, -1, channels * self.factor**2)

    # ----- running --------------------------------------------------------------------------------
    # the base class's pieces: ``embed`` is InternViT's embeddings (CLS prepended, no pre-layer norm), the
    # attention input is the layer's ``layernorm_before`` output
    attention_norm = "layernorm_before"
    attention_module = "attention"

    def run(
        self, pixel_values: torch.Tensor, select_layer: int = -1, capture_attn_input: bool = True, early_exit: bool = True
    ) -> EncoderCapture:
        """Tower up to the scored layer: hidden = its units (B, U, C f^2) (the final ``layernorm`` applied
        for the last layer, as ``last_hidden_state``), attn_input = its ``layernorm_before`` output (B, 1 + P, C).

        The explicit loop of ``VisionEncoderAdapter.run`` (embeddings, then the layers up to the scored one:
        the same modules on the same tensors as InternViT's own forward, so the same values), with
        InternViT's layer call (``layer(hidden)``: no attention mask argument). Plain tensor code:
        ``torch.compile(fullgraph=True)`` captures it, and the compression after it, as one graph.
        ``early_exit=False`` runs the tower's own complete forward and captures the layer with hooks."""
        self.check_pixels(pixel_values)
        index = self.layer_index(select_layer)
        pixel_values = pixel_values.to(dtype=next(self.model.parameters()).dtype)
        if early_exit:
            hidden = self.embed(pixel_values)
            for layer in self.layers[:index]:
                hidden = layer(hidden)
            attn_input = self.attention_input(index, hidden) if capture_attn_input else None
            hidden = self.layers[index](hidden)
        else:
            complete = self._run_complete(pixel_values, index, capture_attn_input)
            hidden, attn_input = complete.hidden, complete.attn_input
        if index == self.num_layers - 1:
            hidden = self.model.layernorm(hidden)  # HF reads last_hidden_state for the last layer
        patches = hidden[:, int(self.tower_has_cls) :]
        return EncoderCapture(self.shuffle(patches), attn_input, index)

    def queries_keys(
        self, layer_index: int, attn_input: torch.Tensor, query_rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The scored layer's q and k as the layer computes them (projection, then its qk-norm over the full
        width), keys pooled to units. attn_input: (B, 1 + P, C). Returns q (B, H, 1, d): the CLS query
        (``query_rows`` does not apply: the units' scoring query is the CLS), or without CLS the units'
        mean queries (B, H, U, d) (``query_rows`` of those); k (B, H, U, d); the softmax scale."""
        attn = self.layers[layer_index].attention
        bsz, n, _ = attn_input.shape
        heads, head_dim = attn.num_heads, attn.head_dim

        def heads_first(x):
            return x.reshape(bsz, n, heads, head_dim).transpose(1, 2)

        members = self.unit_members(attn_input.device)  # (U, f^2)
        offset = int(self.tower_has_cls)

        def pool(x):  # (B, H, 1 + P, d) -> (B, H, U, d): mean over each unit's patches
            return x[:, :, offset:][:, :, members].mean(dim=-2)

        k = pool(heads_first(attn.k_norm(attn.k_proj(attn_input))))
        q = heads_first(attn.q_norm(attn.q_proj(attn_input)))
        if self.tower_has_cls:
            q = q[:, :, :1]
        else:
            q = pool(q)
            if query_rows is not None:
                q = q[:, :, query_rows]
        return q, k, float(attn.scale)


def tower_adapter(model) -> InternViTUnits:
    return InternViTUnits(model.model)


def feature_layer(model, vision_feature_layer=None) -> int:
    layer = model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    return single_layer(layer, type(model).__name__)


def check_strategy(model, strategy=None) -> None:
    strategy = model.config.vision_feature_select_strategy if strategy is None else strategy
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r}: InternVL's pixel shuffle takes the patch grid without "
            "CLS ('default'); compression acts on those units"
        )


def check(model, config) -> None:
    settings = vision_settings(config)
    if settings.stage == "tower":
        raise ValueError(
            f"{settings.name} acts inside the vision tower (stage 'tower'), merging InternViT's patches before "
            "the pixel shuffle, which needs the full patch grid: use an encoder_output method on InternVL"
        )
    check_strategy(model)
    settings.check(tower_adapter(model), feature_layer(model))


def image_features(model, config, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
    """Compressed ``get_image_features``: pixel_values (V, 3, S, S), every tile / thumbnail / frame a
    view -> pooler_output (V, T, hidden), T = ``tokens_per_view``."""
    if pixel_values.dim() != 4:
        raise ValueError(f"InternVL pixel_values must be (tiles, 3, S, S), got {tuple(pixel_values.shape)}")
    check_strategy(model, vision_feature_select_strategy)
    encoded = encode_views(
        tower_adapter(model), pixel_values, feature_layer(model, vision_feature_layer), vision_settings(config)
    )
    features = project(model.model.multi_modal_projector, encoded).tokens
    return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=features)


def _per_view(model, settings) -> int:
    return fixed_count(settings, tower_adapter(model).num_tokens)


def placeholder_counts(model, settings, image_inputs) -> list[int]:
    """Placeholders per image: its tiles (``num_patches``, thumbnail included) x ``tokens_per_view``."""
    return [placeholder_count("flat", int(tiles), _per_view(model, settings)) for tiles in image_inputs["num_patches"]]


def expected_count(model, settings, kwargs) -> int:
    return int(kwargs["pixel_values"].shape[0]) * _per_view(model, settings)


def placeholder_text(processor, count: int) -> str:
    """What one image becomes in the text: InternVL's ``<img>`` + ``count`` context tokens + ``</img>``."""
    return f"{processor.start_image_token}{processor.image_token * count}{processor.end_image_token}"


FAMILY = register_family(
    HFFamily(
        name="internvl",
        class_names=("InternVLForConditionalGeneration",),
        check=check,
        modalities=(
            Modality("image", image_features, placeholder_counts, expected_count, placeholder_text=placeholder_text),
        ),
        llm_view_tokens=lambda model: tower_adapter(model).num_tokens,  # pixel-shuffle units per tile
    )
)
