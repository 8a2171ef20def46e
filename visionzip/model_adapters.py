"""The registry of model adapters: how ``apply_compression`` installs compression on a model class that has
no ``set_visual_compression`` of its own (the Hugging Face families of ``visionzip.hf`` register here).

Its own module so that ``visionzip.apply`` (which looks adapters up) and ``visionzip.hf`` (which registers
them) both import it and neither imports the other at registration time: no import cycle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .config import CompressionConfig

# (matches(model) -> bool, apply(model, config) -> model), in registration order
_MODEL_ADAPTERS: list[tuple[Callable[[object], bool], Callable[[object, CompressionConfig], object]]] = []


def register_model_adapter(matches: Callable[[object], bool], apply: Callable[[object, CompressionConfig], object]):
    """Teach ``apply_compression`` a model family that has no ``set_visual_compression`` of its own."""
    _MODEL_ADAPTERS.append((matches, apply))


def find_model_adapter(model) -> Callable[[object, CompressionConfig], object] | None:
    """The ``apply(model, config)`` of the first registered adapter that matches ``model``, or None."""
    for matches, apply in _MODEL_ADAPTERS:
        if matches(model):
            return apply
    return None
