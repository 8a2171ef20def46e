"""The official one-liners: ``model = visionzip(model, dominant=54, contextual=10)``.

They set the compression configuration on a model that supports it (one with a
``set_visual_compression(config)`` method, such as ``llava.model.LlavaLlamaForCausalLM``); the setting
lands in ``model.config`` and is saved with the checkpoint. No class is patched.
"""
from __future__ import annotations

from .config import CompressionConfig


def apply_compression(model, config: CompressionConfig):
    setter = getattr(model, "set_visual_compression", None)
    if setter is None:
        raise TypeError(
            f"cannot apply visual-token compression to {type(model).__name__}: it has no "
            "set_visual_compression(config) method. Use a model from this codebase "
            "(llava.model.LlavaLlamaForCausalLM), or call visionzip.zip_vision_tokens() on its vision tower."
        )
    setter(config)
    return model


def visionzip(model, dominant: int = 54, contextual: int = 10):
    """Apply VisionZip with ``dominant`` + ``contextual`` tokens per image (per crop on LLaVA-NeXT)."""
    return apply_compression(model, CompressionConfig(method="visionzip", dominant=dominant, contextual=contextual))


def vispruner(model, tokens: int = 64, important_ratio: float = 0.5):
    """Apply VisPruner with ``tokens`` per image (per crop on LLaVA-NeXT)."""
    return apply_compression(
        model, CompressionConfig(method="vispruner", tokens=tokens, important_ratio=important_ratio)
    )
