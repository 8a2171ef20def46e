"""Vision towers: a Hugging Face CLIP or SigLIP vision model, its image processor, and LLaVA's feature
selection (``mm_vision_select_layer`` / ``mm_vision_select_feature``) with the vision-side stage of any
registered compression method.

The tower runs once per batch through ``visionzip.encoder_adapter(...).run``: up to the selected layer
(the layers after it are skipped, LLaVA never uses them), keeping its SDPA / FlashAttention kernels, and
capturing that layer's attention input when a compression method needs to score tokens.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.integrations import is_deepspeed_zero3_enabled

import visionzip
from visionzip import CompressedTokens, CompressionConfig
from visionzip.pipeline import encode_views, vision_method

SELECT_FEATURES = ("patch", "cls_patch")


class VisionTower(nn.Module):
    """A vision encoder as LLaVA uses it. Subclasses name the HF model, config and image-processor classes.

    ``delay_load=True`` (how a LLaVA checkpoint builds it) reads only the encoder's config; the weights are
    loaded later by ``load_model`` from ``vision_tower`` (the ``mm_vision_tower`` path or hub id), as in the
    original. With ``unfreeze_mm_vision_tower`` the tower was trained, so its structure is built at once and
    its weights come from the enclosing checkpoint instead.
    """

    model_class: type = None
    config_class: type = None
    # The PIL-based processors: their pixels equal the original LLaVA's exactly, whereas the torchvision
    # ones that AutoImageProcessor may pick where torchvision is installed resize differently.
    processor_class: type = None
    has_cls: bool = True

    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = int(getattr(args, "mm_vision_select_layer", -2))
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature must be one of {SELECT_FEATURES}, got {self.select_feature!r}"
            )
        if self.select_feature == "cls_patch" and not self.has_cls:
            raise ValueError(f"mm_vision_select_feature 'cls_patch' needs a CLS token; {vision_tower} has none")
        if not delay_load:
            self.load_model()
        elif getattr(args, "unfreeze_mm_vision_tower", False):
            self.build_model()
        else:
            self.cfg_only = self.config_class.from_pretrained(self.vision_tower_name)

    # ----- construction ------------------------------------------------------------------------
    def load_model(self, device_map=None, **kwargs) -> None:
        """Load the encoder's weights and image processor from ``vision_tower_name`` (frozen)."""
        if self.is_loaded:
            return
        self.image_processor = self.processor_class.from_pretrained(self.vision_tower_name)
        self.vision_tower = self.model_class.from_pretrained(
            self.vision_tower_name, device_map=device_map, attn_implementation="sdpa", **kwargs
        )
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def build_model(self) -> None:
        """The encoder's structure only; its weights are filled in by the enclosing ``from_pretrained``."""
        config = self.config_class.from_pretrained(self.vision_tower_name, attn_implementation="sdpa")
        self.image_processor = self.processor_class.from_pretrained(self.vision_tower_name)
        self.vision_tower = self.model_class(config)
        self.is_loaded = True

    # ----- features ---------------------------------------------------------------------------
    @property
    def adapter(self) -> visionzip.VisionEncoderAdapter:
        return visionzip.encoder_adapter(self.vision_tower)

    def feature_select(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLaVA's feature selection on the selected layer's output: drop the CLS token for "patch"."""
        if self.select_feature == "patch" and self.has_cls:
            return hidden[:, 1:]
        return hidden

    def _trainable(self) -> bool:
        return any(p.requires_grad for p in self.vision_tower.parameters())

    def encode(
        self, images: torch.Tensor, compression: CompressionConfig | None = None
    ) -> tuple[torch.Tensor, CompressedTokens | None]:
        """Stage 1 of the image pipeline (``visionzip.pipeline.encode_views`` on this tower's adapter, layer
        and feature selection): views (V, 3, S, S) -> (tokens (V, T, C) in the encoder's feature space,
        compressed or None).

        Without a vision-side method the tokens are the selected features (T = 576 patches for
        ViT-L/14-336); with one (``compression.settings.stage`` "tower" or "encoder_output"),
        ``compressed.tokens`` (the same tensor) and ``compressed.keep_indices`` say which encoder positions
        survived. One tower pass either way. In-LLM methods leave the tower's output whole.
        """
        if not self.is_loaded:
            raise ValueError(f"the vision tower {self.vision_tower_name!r} is not loaded yet (call load_model())")
        # ZeRO-3 gathers parameters with hooks on a complete forward: do not stop early there
        early_exit = not is_deepspeed_zero3_enabled()
        # [VisionZip-LLaVA] the original always runs the tower under no_grad; we keep gradients when the
        # tower itself is being trained (unfreeze_mm_vision_tower), and skip them otherwise.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._trainable()):
            encoded = encode_views(
                self.adapter, images.to(device=self.device), self.select_layer, vision_method(compression),
                drop_cls=self.select_feature == "patch", early_exit=early_exit,
            )
        return encoded.tokens.to(images.dtype), encoded.compressed

    def forward(self, images):
        """Selected features of a batch (B, 3, S, S) -> (B, T, C), uncompressed (the original's call)."""
        return self.encode(images)[0]

    def check_compression(self, compression: CompressionConfig) -> None:
        """A ValueError naming the value and the limit if the budget does not fit this encoder."""
        if not compression.enabled:
            return
        if self.is_loaded:
            visionzip.check_budget(self.vision_tower, compression, self.select_layer)
            return
        # [VisionZip-LLaVA] a model whose tower is not loaded yet (delay_load) is checked against the tower
        # its config describes, built on the meta device (the structure only: no weights, no memory), so a
        # budget that cannot fit is refused now rather than at the first image
        with torch.device("meta"):
            skeleton = self.model_class(self.cfg_only)
        visionzip.check_budget(skeleton, compression, self.select_layer)

    # ----- geometry ---------------------------------------------------------------------------
    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // int(self.config.patch_size)

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


class CLIPVisionTower(VisionTower):
    model_class = CLIPVisionModel
    config_class = CLIPVisionConfig
    processor_class = CLIPImageProcessorPil
    has_cls = True


class SiglipVisionTower(VisionTower):
    """SigLIP has no CLS token: "patch" keeps every token, and VisionZip scores by received attention."""

    model_class = SiglipVisionModel
    config_class = SiglipVisionConfig
    processor_class = SiglipImageProcessorPil
    has_cls = False
