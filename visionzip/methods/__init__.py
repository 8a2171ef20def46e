"""The compression methods, one file each, and their registry (name -> settings class)."""
# importing a method's module registers it: VisionZip and VisPruner, the vision-side baselines (pooling,
# prumerge, random_tokens, tome) and the in-LLM ones (fastv, pdrop, sparsevlm)
from . import fastv, pdrop, pooling, prumerge, random_tokens, sparsevlm, tome, visionzip, vispruner  # noqa: F401
from .base import (
    STAGES,
    CompressedTokens,
    MethodSettings,
    get_method,
    register_method,
    registered_methods,
    unregister_method,
)

__all__ = [
    "STAGES",
    "CompressedTokens",
    "MethodSettings",
    "get_method",
    "register_method",
    "registered_methods",
    "unregister_method",
]
