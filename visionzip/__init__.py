"""VisionZip and VisPruner: visual-token compression for vision-language models, model-agnostic.

Public API
----------
- ``zip_vision_tokens(vision_model, pixel_values, dominant, contextual, select_layer=-2)``
- ``vispruner_select(vision_model, pixel_values, num_tokens, important_ratio=0.5, select_layer=-2)``
- ``apply_compression(model, SPEC)``: the one entry, SPEC ``none`` | ``METHOD:TOKENS`` | ``METHOD:key=value,...``
- ``visionzip(model, dominant=54, contextual=10)`` / ``vispruner(model, tokens=64)``: the one-liners
- ``CompressionConfig``: method + settings, what a model persists in its ``config.json``
- ``registered_methods()`` / ``get_method(name)`` / ``register_method``: the methods, one file each
- ``compress`` / ``compress_capture`` / ``check_budget`` and ``encoder_adapter``: for model code
"""
from .anyres import official_anyres_layout
from .apply import apply_compression, register_model_adapter, visionzip, vispruner
from .compress import check_budget, compress, compress_capture
from .config import VISIONZIP_BUDGETS, VISIONZIP_NEXT_BUDGETS, CompressionConfig, parse_spec
from .encoders import EncoderCapture, VisionEncoderAdapter, encoder_adapter
from .methods import CompressedTokens, MethodSettings, get_method, register_method, registered_methods
from .methods.visionzip import VisionZipOutput, merge_contextual, select_dominant, zip_vision_tokens
from .methods.vispruner import VisPrunerOutput, vispruner_keep_indices, vispruner_select

__version__ = "0.1.0"

__all__ = [
    "VISIONZIP_BUDGETS",
    "VISIONZIP_NEXT_BUDGETS",
    "CompressedTokens",
    "CompressionConfig",
    "EncoderCapture",
    "MethodSettings",
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
