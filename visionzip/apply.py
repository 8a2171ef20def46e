"""The one Python entry: ``visionzip.apply_compression(model, SPEC)``, and the official one-liners
``model = visionzip(model, dominant=54, contextual=10)`` / ``vispruner(model, tokens=64)``.

They set the compression configuration on a model that supports it (one with a
``set_visual_compression(config)`` method, such as ``llava.model.LlavaLlamaForCausalLM``, or a
Hugging Face model class with a registered adapter); the setting lands in ``model.config`` and is saved
with the checkpoint. No class is patched.
"""
from __future__ import annotations

from .config import CompressionConfig
from .model_adapters import find_model_adapter, register_model_adapter

__all__ = ["apply_compression", "register_model_adapter", "visionzip", "vispruner"]


def apply_compression(model, spec: str | CompressionConfig | dict | None, anyres_layout: str | None = None):
    """Apply the compression ``spec`` (a spec string such as ``"visionzip:64"``, a ``CompressionConfig``,
    its dict, or None / ``"none"`` to remove it) to ``model`` and return the model."""
    config = CompressionConfig.parse(spec) if anyres_layout is None else CompressionConfig.parse(spec, anyres_layout)
    if anyres_layout is not None and config.anyres_layout != anyres_layout:
        config = CompressionConfig(config.method, config.settings, anyres_layout=anyres_layout)
    setter = getattr(model, "set_visual_compression", None)
    if setter is not None:
        setter(config)
        return model
    from . import hf  # registers the Hugging Face families (imports transformers' model modules)

    install = find_model_adapter(model)
    if install is not None:
        return install(model, config)
    raise TypeError(
        f"cannot apply visual-token compression to {type(model).__name__}: it has no "
        "set_visual_compression(config) method and no registered adapter. Use a model from this codebase "
        "(llava.model.LlavaLlamaForCausalLM), a supported Hugging Face class "
        f"({', '.join(hf.supported_classes())}), or call visionzip.zip_vision_tokens() on its vision tower."
    )


def visionzip(model, dominant: int = 54, contextual: int = 10):
    """Apply VisionZip with ``dominant`` + ``contextual`` tokens per image (per crop on LLaVA-NeXT)."""
    return apply_compression(model, CompressionConfig(method="visionzip", dominant=dominant, contextual=contextual))


def vispruner(model, tokens: int = 64, important_ratio: float = 0.5):
    """Apply VisPruner with ``tokens`` per image (per crop on LLaVA-NeXT)."""
    return apply_compression(
        model, CompressionConfig(method="vispruner", tokens=tokens, important_ratio=important_ratio)
    )
