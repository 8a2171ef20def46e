"""The one Python entry: ``visionzip.apply_compression(model, SPEC)``, and the official one-liners
``model = visionzip(model, dominant=54, contextual=10)`` / ``vispruner(model, tokens=64)``.

They set the compression configuration on a model that supports it (one with a
``set_visual_compression(config)`` method, such as ``llava.model.LlavaLlamaForCausalLM``, or a
Hugging Face model class with a registered adapter); the setting lands in ``model.config`` and is saved
with the checkpoint. No class is patched.
"""
from __future__ import annotations

from typing import Callable

from .config import CompressionConfig

# Hugging Face model classes (or other foreign models) -> a function(model, config) that installs the
# compression on that instance. Filled by ``visionzip.hf`` when it is imported.
_MODEL_ADAPTERS: list[tuple[Callable[[object], bool], Callable[[object, CompressionConfig], object]]] = []


def register_model_adapter(matches: Callable[[object], bool], apply: Callable[[object, CompressionConfig], object]):
    """Teach ``apply_compression`` a model family that has no ``set_visual_compression`` of its own."""
    _MODEL_ADAPTERS.append((matches, apply))


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

    for matches, apply in _MODEL_ADAPTERS:
        if matches(model):
            return apply(model, config)
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
