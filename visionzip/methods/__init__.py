"""The compression methods, one file each, and their registry (name -> settings class).

Every module of this package is imported here (``pkgutil``), and importing a method's module registers
it (``@register_method``): a new method is one new file, with no edit elsewhere. ``docs/adding_a_method.md``
walks through writing one.
"""
import importlib
import pkgutil

from .base import (
    STAGES,
    CompressedTokens,
    CompressionMethod,
    get_method,
    register_method,
    registered_methods,
    unregister_method,
)

# sorted so the registry fills in the same order on every filesystem
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "STAGES",
    "CompressedTokens",
    "CompressionMethod",
    "get_method",
    "register_method",
    "registered_methods",
    "unregister_method",
]
