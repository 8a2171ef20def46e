"""Loading a transformers checkpoint together with the compression saved in it.

``apply_compression`` writes the setting to ``model.config.visual_compression``, so ``save_pretrained``
(and ``llava.convert to-hf`` of a VisionZip‡ checkpoint) stores it in ``config.json``. transformers'
own ``from_pretrained`` keeps that key but knows nothing of it, and we do not patch its classes: a model
loaded that way runs uncompressed. So:

- ``visionzip.hf.from_pretrained(PATH)`` loads the checkpoint's class (its ``architectures``) and applies
  the saved compression: the round trip ``save_pretrained`` -> ``from_pretrained`` gives back the
  compressed model;
- a model whose config names a compression that is not installed on it (a stock ``from_pretrained``) is
  refused by ``compression_aware_processor`` with a message that says how to apply it, instead of running
  uncompressed silently (``saved_but_not_applied``).
"""
from __future__ import annotations

import os

from ..config import CompressionConfig
from .base import current_compression, family_of, install


def saved_compression(model) -> CompressionConfig:
    """The compression ``model.config`` names (``CompressionConfig()`` when none)."""
    saved = getattr(getattr(model, "config", None), "visual_compression", None)
    return CompressionConfig.parse(saved) if saved else CompressionConfig()


def saved_but_not_applied(model) -> CompressionConfig | None:
    """The saved compression of a model on which it is not installed (a stock ``from_pretrained``), else None."""
    saved = saved_compression(model)
    if saved.enabled and not current_compression(model).enabled:
        return saved
    return None


def _model_class(path: str | os.PathLike, **kwargs):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("revision", "local_files_only")})
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForImageTextToText


def from_pretrained(path: str | os.PathLike, model_class=None, **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` (default: the class ``config.json``'s
    ``architectures`` names) with the compression its ``config.json`` saved applied to the instance, as
    ``visionzip.apply_compression`` would (budget checked against the tower first)."""
    cls = model_class or _model_class(path, **kwargs)
    model = cls.from_pretrained(path, **kwargs)
    family = family_of(model)  # a TypeError naming the supported classes, for a class we cannot compress
    saved = saved_compression(model)
    if saved.enabled:
        install(family, model, saved)  # what apply_compression does for this family
    return model
