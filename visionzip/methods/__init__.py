"""The compression methods, one file each, and their registry (name -> method)."""
from . import visionzip, vispruner  # noqa: F401  (registers the methods)
from .base import CompressedTokens, get_method, register_method, registered_methods

__all__ = ["CompressedTokens", "get_method", "register_method", "registered_methods"]
