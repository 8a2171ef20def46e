"""A method on a bare vision model, as functions: validate a budget, run the encoder once, compress.

For a user who holds a Hugging Face vision model (``CLIPVisionModel``, ``SiglipVisionModel``, ...) rather
than a whole VLM (for that: ``apply_compression``). Model code (``llava``'s tower, the ``visionzip.hf``
families) builds its encoder adapter once and runs ``visionzip.pipeline``'s stages: the same calls these
functions make.
"""
from __future__ import annotations

import torch

from .config import CompressionConfig
from .encoders import EncoderCapture, VisionEncoderAdapter, encoder_adapter
from .methods import CompressedTokens
from .pipeline import encode_views


def _settings(config: CompressionConfig):
    config = CompressionConfig.parse(config)
    return None if not config.enabled else config.settings


def check_budget(vision_model, config: CompressionConfig, select_layer: int = -2) -> None:
    """Raise a ValueError naming the value and the limit if ``config`` does not fit the encoder."""
    settings = _settings(config)
    if settings is not None and settings.stage != "llm":
        settings.check(encoder_adapter(vision_model), select_layer)


def compress_capture(
    adapter: VisionEncoderAdapter, capture: EncoderCapture, config: CompressionConfig
) -> CompressedTokens:
    """Compress an encoder pass captured by ``adapter.run`` (an encoder-output method)."""
    settings = _settings(config)
    if settings is None:
        raise ValueError("compress_capture() needs a compression method; got method='none'")
    return settings.compress(adapter, capture)


def compress(
    vision_model, pixel_values: torch.Tensor, config: CompressionConfig, select_layer: int = -2
) -> CompressedTokens:
    """Run the encoder on ``pixel_values`` (B, 3, H, W) and compress (a vision-side method)."""
    settings = _settings(config)
    if settings is None:
        raise ValueError("compress() needs a compression method; got method='none'")
    if settings.stage == "llm":
        raise ValueError(f"{settings.name} acts inside the LLM, not on the vision tower's output")
    adapter = encoder_adapter(vision_model)
    settings.check(adapter, select_layer)
    adapter.check_pixel_values(pixel_values)
    return encode_views(adapter, pixel_values, select_layer, settings).compressed
