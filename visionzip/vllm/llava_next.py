"""LLaVA-NeXT (llava-hf ``LlavaNextForConditionalGeneration``) served by vLLM with visual-token compression.

Each image is a base view plus a grid of crops (anyres, ``image_grid_pinpoints``); every view is compressed on
its own to ``tokens_per_view`` tokens (the budget is per view, as in the VisionZip paper's NeXT tables and in
this project's transformers path, ``visionzip.hf.llava_next``), and the views are laid out as the official
VisionZip LLaVA-NeXT code does (``visionzip.official_anyres_layout``, docs/visionzip.md): the base view's
tokens, then the crops' kept tokens in row-major order of the full patch grid, each crop's CLS, then all crops'
merged tokens; no unpad and no ``image_newline``. An image with a rows x cols grid is therefore
``(1 + rows * cols) * tokens_per_view`` tokens, known from its size before it is encoded: that is the
placeholder count vLLM reserves (``VisionZipLlavaNextProcessingInfo.get_num_image_tokens``).

Subclasses of vLLM's own classes, no patching; the tower, its adapter and the method code are the LLaVA-1.5
plugin's (``visionzip.vllm.llava``). Only the ``official`` layout is served: the ``spatial`` layout's count
depends on the kept positions, which vLLM must know before it encodes the image.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..hf.base import fixed_count
from ..pipeline import CropGrid, ViewTokens, layout_images
from .encoders import encode_on_tower
from .llava import (
    _nest_vision_model,
    compression_config,
    compression_settings,
    set_up_compression,
    tower_tokens,
)


def next_settings(hf_config):
    """``compression_settings`` for LLaVA-NeXT: also a ValueError for a layout other than ``official``."""
    settings = compression_settings(hf_config)
    layout = compression_config(hf_config).anyres_layout
    if settings is not None and layout != "official":
        raise ValueError(
            f"visual_compression={settings.spec()!r} with anyres_layout={layout!r}: the vLLM plugin lays LLaVA-NeXT "
            "crops out as the official VisionZip code does (anyres_layout='official'); the spatial layout's token "
            "count depends on the kept positions, which vLLM must reserve before it encodes the image"
        )
    return settings


def grid_shape(hf_config, image_height: int, image_width: int) -> tuple[int, int]:
    """(rows, cols) of the crop grid (``image_grid_pinpoints`` are (height, width) pairs in llava-hf configs)."""
    return get_anyres_image_grid_shape(
        (image_height, image_width), hf_config.image_grid_pinpoints, hf_config.vision_config.image_size
    )


class VisionZipLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        settings = next_settings(config)
        if settings is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        rows, cols = grid_shape(config, image_height, image_width)
        return (1 + rows * cols) * fixed_count(settings, tower_tokens(config))


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor,
    info=VisionZipLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with each view compressed by a vision-side method, in the official VisionZip layout."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        settings = next_settings(config)  # before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        set_up_compression(self, settings, vllm_config, prefix)

    def _process_image_input(self, image_input) -> torch.Tensor | list[torch.Tensor]:
        if self.compression is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        views_given = [views.shape[0] for views in pixel_values]
        sizes = image_input.get("image_sizes")
        if sizes is None:  # vLLM's default: the tower's square size (one crop)
            side = self.config.vision_config.image_size
            sizes = [(side, side)] * len(views_given)
        counts = []
        for size, given in zip(sizes, views_given):
            rows, cols = grid_shape(self.config, *[int(v) for v in size])
            if given < 1 + rows * cols:
                raise ValueError(f"an image of size {tuple(int(v) for v in size)} needs {1 + rows * cols} views, got {given}")
            counts.append((rows, cols))
        views = torch.cat([image[: 1 + rows * cols] for image, (rows, cols) in zip(pixel_values, counts)])
        compressed = encode_on_tower(self.compression, self.tower_adapter, views, self.feature_layer, self.view_tokens)
        features = ViewTokens(self.multi_modal_projector(compressed.tokens), compressed)  # (V, T, hidden)
        # the one layout code (visionzip.pipeline): base view, then the crops in the official VisionZip layout
        side = self.tower_adapter.patches_per_side
        grids = [CropGrid(rows, cols, side, tuple(int(v) for v in size)) for size, (rows, cols) in zip(sizes, counts)]
        return layout_images(features, [1 + rows * cols for rows, cols in counts], "official", grids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(_nest_vision_model(weights))

    @torch.inference_mode()
    def process_weights_after_loading(self) -> None:
        """Encode a blank image at startup, so that a method that cannot run on vLLM's tower is refused then
        (as ``VisionZipLlavaForConditionalGeneration.process_weights_after_loading``)."""
        if self.compression is None:
            return
        side = self.tower_adapter.image_size
        param = next(self.vision_tower.parameters())
        rows, cols = grid_shape(self.config, side, side)
        blank = torch.zeros(1, 1 + rows * cols, 3, side, side, dtype=param.dtype, device=param.device)
        self._process_image_input({"pixel_values": blank, "image_sizes": [(side, side)]})
