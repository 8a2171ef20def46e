"""LLaVA-1.5 (llava-hf ``LlavaForConditionalGeneration``) served by vLLM with visual-token compression.

Two subclasses of vLLM's own LLaVA classes, no patching of vLLM:

- ``VisionZipLlavaProcessingInfo.get_num_image_tokens``: the placeholder count vLLM writes into the prompt
  for each image is the compressed count (``settings.tokens_per_view`` of the CLIP tower's 577 tokens), so
  the KV cache, the scheduler and ``usage.prompt_tokens`` see the shorter sequence;
- ``VisionZipLlavaForConditionalGeneration._process_image_pixels``: the image features are the method's
  ``encode`` on vLLM's CLIP tower (``VllmCLIPEncoderAdapter``: the tower runs to the scored layer, the scores
  come from that layer's q and k; with a method the tower is built to its full depth, ``full_depth_tower``),
  mapped by the projector: one (T, hidden) block per image, T = the count above. The same method code as
  the Hugging Face path (``visionzip.hf.llava``).

The compression is the config's ``visual_compression`` (a spec ``METHOD:TOKENS`` / ``METHOD:key=value,...``
or the dict ``apply_compression`` persists), given with ``--hf-overrides``; it is checked when the model is
built (a ValueError naming the spec: unknown method, a budget the tower cannot give, a method acting inside
the LLM, a method whose count depends on the image); a method that cannot run on vLLM's tower fails with a
ValueError naming it at startup (``process_weights_after_loading`` encodes a blank image), not on a request.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..config import CompressionConfig
from ..hf.base import fixed_count, vision_settings
from ..methods import CompressionMethod
from .encoders import attach_compression, encode_on_tower


def compression_config(hf_config) -> CompressionConfig:
    """The ``CompressionConfig`` that ``hf_config.visual_compression`` names (a spec or ``to_dict``'s dict)."""
    spec = getattr(hf_config, "visual_compression", None)
    if isinstance(spec, dict):
        return CompressionConfig.from_dict(spec)
    return CompressionConfig.parse(spec) if spec else CompressionConfig()


def compression_settings(hf_config) -> CompressionMethod | None:
    """The vision-side method settings that ``hf_config.visual_compression`` names (None: uncompressed).
    ValueError for a bad spec or a method that acts inside the LLM (stage ``llm``)."""
    config = compression_config(hf_config)
    if not config.enabled:
        return None
    try:
        settings = vision_settings(config)
    except ValueError as err:
        raise ValueError(
            f"visual_compression={config.spec()!r}: {err}. The vLLM plugin compresses in the vision tower, "
            "before the language model; in-LLM methods (stage 'llm') are not served"
        ) from None
    vision = hf_config.vision_config
    if type(vision).__name__ != "CLIPVisionConfig":
        raise ValueError(
            f"visual_compression={config.spec()!r}: the vLLM plugin has a CLIP tower adapter only, this model's "
            f"vision tower is {type(vision).__name__}"
        )
    return settings


def _nest_vision_model(weights: Iterable[tuple[str, torch.Tensor]]):
    """[VisionZip-LLaVA] transformers 5 saves a LLaVA's CLIP tower without its ``vision_model`` level
    (``model.vision_tower.embeddings...``), the layout ``llava.convert to-hf`` writes; vLLM 0.32 maps only the
    4.x names (``model.vision_tower.vision_model.embeddings...``). Rename to the 4.x names."""
    tower = "model.vision_tower."
    for name, tensor in weights:
        if name.startswith(tower) and not name.startswith(tower + "vision_model."):
            name = tower + "vision_model." + name[len(tower):]
        yield name, tensor


def full_depth_tower(model, vllm_config, prefix: str) -> None:
    """[VisionZip-LLaVA] vLLM builds (and loads) a LLaVA's CLIP tower only up to its feature layer
    (``vision_feature_layer=-2``: 23 of 24 layers), but a method may score a later layer (PruMerge: the last
    layer's q and k), and the methods do not declare which layers they read. With a method configured, replace
    the truncated tower, before any weight is loaded, by vLLM's own ``CLIPVisionModel`` built to the config's
    depth: vLLM's weight loader then loads the remaining layers too. The adapter still runs only up to the
    layer a method selects (the features stay the feature layer's); the cost is the weights of the layers after
    the feature layer (one ViT-L/14 layer: 12.6 M parameters). Built in ``_mark_tower_model``, as vLLM builds
    its tower (tower offloading), keeping vLLM's list of the tower's modules as it was."""
    vision = vllm_config.model_config.hf_config.vision_config
    tower = model.vision_tower
    if not isinstance(tower, CLIPVisionModel) or len(tower.vision_model.encoder.layers) >= vision.num_hidden_layers:
        return  # no image tower in this engine (image limit 0), or already complete
    tower_modules = list(model._tower_model_names)
    with model._mark_tower_model(vllm_config, "image"):
        model.vision_tower = CLIPVisionModel(
            vision,
            quant_config=vllm_config.quant_config,
            num_hidden_layers_override=vision.num_hidden_layers,
            require_post_norm=False,  # as vLLM's LLaVA: the features are a hidden layer's, never normed
            prefix=maybe_prefix(prefix, "vision_tower"),
        )
    model._tower_model_names = tower_modules


def set_up_compression(model, settings: CompressionMethod | None, vllm_config, prefix: str) -> None:
    """After a vLLM LLaVA-family model's ``__init__`` (LLaVA-1.5, NeXT): with a method, the tower built to full
    depth (``full_depth_tower``); then what its image path needs (``encoders.attach_compression``)."""
    if settings is not None:
        full_depth_tower(model, vllm_config, prefix)
    attach_compression(model, settings, vllm_config.model_config.hf_config.vision_feature_layer)


def tower_tokens(hf_config) -> int:
    """Tokens of the CLIP tower's sequence for one image: patches + CLS."""
    vision = hf_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


class VisionZipLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        settings = compression_settings(self.get_hf_config())
        if settings is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        # [VisionZip-LLaVA] every image is resized to the tower's square input: one fixed count per image
        return fixed_count(settings, tower_tokens(self.get_hf_config()))


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor,
    info=VisionZipLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with the image features of a vision-side compression method."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        settings = compression_settings(config)  # before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        set_up_compression(self, settings, vllm_config, prefix)  # one image = one view

    def _process_image_pixels(self, inputs) -> torch.Tensor:
        if self.compression is None:
            return super()._process_image_pixels(inputs)
        pixel_values = inputs["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        compressed = encode_on_tower(self.compression, self.tower_adapter, pixel_values, self.feature_layer,
                                     self.view_tokens)
        # (B, T, C_vision): the projector maps it to B x (T, hidden), T = get_num_image_tokens
        return compressed.tokens

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(_nest_vision_model(weights))

    @torch.inference_mode()
    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook after the weights are loaded and put in kernel format: run the method once
        on a blank image, so that a method that cannot run on vLLM's tower is refused at startup (GPU startup
        also encodes dummy images in its profiling run; the CPU backend under ``enforce_eager`` does not)."""
        if self.compression is None:
            return
        size = self.tower_adapter.image_size
        param = next(self.vision_tower.parameters())
        self._process_image_pixels({"pixel_values": torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)})
