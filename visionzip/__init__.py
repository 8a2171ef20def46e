"""Visual-token compression for vision-language models, model-agnostic: one registry of methods (VisionZip,
VisPruner and the baselines the papers compare against, vision-side and in-LLM: ``registered_methods()``,
one file each in ``visionzip/methods/``), applied to our LLaVA or to Hugging Face model classes.

Public API
----------
- ``apply_compression(model, SPEC)``: the one entry for a whole model, SPEC ``none`` | ``METHOD:TOKENS`` |
  ``METHOD:key=value,...``; ``visionzip(model, dominant=54, contextual=10)`` / ``vispruner(model, tokens=64)``:
  the official one-liners
- ``CompressionConfig``: method + settings, what a model persists in its ``config.json``
- ``registered_methods()`` / ``get_method(name)`` / ``register_method``: the methods (``docs/adding_a_method.md``)
- ``compress`` / ``compress_capture`` / ``check_budget`` and ``encoder_adapter``: a method on a bare vision
  model (the functional API; model code builds its adapter once and calls the method's ``encode``)
- ``zip_vision_tokens`` / ``vispruner_select``: VisionZip's and VisPruner's own functional forms
- ``visionzip.budgets``: the budget families (paper totals per image -> per-view budgets)
"""
from .anyres import official_anyres_layout
from .apply import apply_compression, register_model_adapter, visionzip, vispruner
from .compress import check_budget, compress, compress_capture
from .config import CompressionConfig, parse_spec
from .encoders import EncoderCapture, VisionEncoderAdapter, encoder_adapter
from .methods import CompressedTokens, CompressionMethod, get_method, register_method, registered_methods
from .methods.visionzip import (
    VISIONZIP_BUDGETS,
    VISIONZIP_NEXT_BUDGETS,
    VisionZipOutput,
    merge_contextual,
    select_dominant,
    zip_vision_tokens,
)
from .methods.vispruner import VisPrunerOutput, vispruner_keep_indices, vispruner_select

__version__ = "0.1.0"

__all__ = [
    "VISIONZIP_BUDGETS",
    "VISIONZIP_NEXT_BUDGETS",
    "CompressedTokens",
    "CompressionConfig",
    "EncoderCapture",
    "CompressionMethod",
    "VisPrunerOutput",
    "VisionEncoderAdapter",
    "VisionZipOutput",
    "apply_compression",
    "check_budget",
    "compress",
    "compress_capture",
    "encoder_adapter",
    "get_method",
    "merge_contextual",
    "official_anyres_layout",
    "parse_spec",
    "register_method",
    "register_model_adapter",
    "registered_methods",
    "select_dominant",
    "vispruner",
    "vispruner_keep_indices",
    "vispruner_select",
    "visionzip",
    "zip_vision_tokens",
]
