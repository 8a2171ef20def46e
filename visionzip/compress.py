"""One entry point for model code: validate a budget, run the encoder once, compress."""
from __future__ import annotations

import torch

from .config import CompressionConfig
from .encoders import EncoderCapture, VisionEncoderAdapter, encoder_adapter
from .methods import CompressedTokens, get_method


def check_budget(vision_model, config: CompressionConfig, select_layer: int = -2) -> None:
    """Raise a ValueError naming the value and the limit if ``config`` does not fit the encoder."""
    if config.enabled:
        get_method(config.method).check(encoder_adapter(vision_model), config, select_layer)


def compress_capture(
    adapter: VisionEncoderAdapter, capture: EncoderCapture, config: CompressionConfig
) -> CompressedTokens:
    """Compress an encoder pass captured by ``adapter.run`` (``config.method`` must not be "none")."""
    return get_method(config.method).compress(adapter, capture, config)


def compress(
    vision_model, pixel_values: torch.Tensor, config: CompressionConfig, select_layer: int = -2
) -> CompressedTokens:
    """Run the encoder on ``pixel_values`` (B, 3, H, W) and compress its selected layer."""
    if not config.enabled:
        raise ValueError("compress() needs a compression method; got method='none'")
    adapter = encoder_adapter(vision_model)
    check_budget(adapter, config, select_layer)
    capture = adapter.run(pixel_values, select_layer)
    return compress_capture(adapter, capture, config)
