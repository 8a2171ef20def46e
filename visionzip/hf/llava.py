"""``transformers.LlavaForConditionalGeneration`` (llava-hf LLaVA-1.5 checkpoints).

The HF model's image features are ``multi_modal_projector(hidden_states[vision_feature_layer])`` of the
CLIP tower, minus CLS under ``vision_feature_select_strategy="default"``: one (576, hidden) block per image.
With compression, the tower runs to the scored layer (``vision_feature_layer``), the method compresses
each image on its own (``settings.encode``; VisionZip keeps CLS among its dominant tokens, as the official
LLaVA code does), and the projector maps the kept tokens: ``tokens_per_view`` features per image. The
stages are ``visionzip.pipeline``'s on this family's tower, projector and layer (the ``flat`` layout).
"""
from __future__ import annotations

from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..encoders import encoder_adapter
from ..pipeline import ViewTokens, encode_views, placeholder_count
from ..pipeline import project as project_views
from .base import HFFamily, Modality, fixed_count, register_family, single_layer, vision_settings


def tower_adapter(model):
    return encoder_adapter(model.model.vision_tower)


def feature_layer(model, vision_feature_layer=None) -> int:
    layer = model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    return single_layer(layer, type(model).__name__)


def project(model, encoded: ViewTokens) -> ViewTokens:
    """(V, T, C_vision) kept encoder tokens -> (V, T, hidden) LLM features, through the family's projector."""
    return project_views(model.model.multi_modal_projector, encoded)


def view_tokens(model) -> int:
    """Visual tokens one image (one anyres view) puts into the LLM uncompressed: the tower's patches, plus
    the CLS token under ``vision_feature_select_strategy="full"`` (in-LLM budgets are per view)."""
    adapter = tower_adapter(model)
    full = model.config.vision_feature_select_strategy == "full"
    return adapter.num_patches + int(adapter.has_cls and full)


def check(model, config) -> None:
    settings = vision_settings(config)
    settings.check(tower_adapter(model), feature_layer(model))


def image_features(
    model, config, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None, **kwargs
):
    """Compressed ``get_image_features``: pixel_values (B, 3, S, S) -> pooler_output, B x (T, hidden)."""
    if image_sizes is not None:
        raise ValueError(
            "image_sizes is for towers with variable input size (Pixtral); the compressed CLIP path takes "
            "fixed-size (B, 3, S, S) pixel_values"
        )
    encoded = encode_views(
        tower_adapter(model), pixel_values, feature_layer(model, vision_feature_layer), vision_settings(config)
    )
    features = project(model, encoded).tokens
    return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=list(features.unbind(0)))


def placeholder_counts(model, settings, image_inputs) -> list[int]:
    count = placeholder_count("flat", 1, fixed_count(settings, tower_adapter(model).num_tokens))
    return [count] * len(image_inputs["pixel_values"])


def expected_count(model, settings, kwargs) -> int | None:
    pixel_values = kwargs.get("pixel_values")
    if pixel_values is None:
        return None
    return placeholder_counts(model, settings, {"pixel_values": pixel_values})[0] * pixel_values.shape[0]


FAMILY = register_family(
    HFFamily(
        name="llava",
        class_names=("LlavaForConditionalGeneration",),
        check=check,
        modalities=(Modality("image", image_features, placeholder_counts, expected_count),),
        llm_view_tokens=view_tokens,
    )
)
