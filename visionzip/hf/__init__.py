"""Visual-token compression for Hugging Face vision-language model classes, one file per family.

Importing this package registers the families with ``visionzip.apply_compression`` (which imports it on
first use), so ``visionzip.apply_compression(hf_model, "visionzip:64")`` works on the supported classes
(``supported_classes()``). Pair the model with ``compression_aware_processor(processor, model)`` so that
``inputs = processor(...); model.generate(**inputs)`` feeds the LLM only the kept tokens.
``from_pretrained(PATH)`` loads a checkpoint with the compression its ``config.json`` saved applied.
"""
from . import internvl, llava, llava_next, onevision, qwen2_5_vl, video_llava  # noqa: F401  (registers the families)
from .base import current_compression, supported_classes
from .loading import from_pretrained, saved_compression
from .processor import compression_aware_processor

__all__ = ["compression_aware_processor", "current_compression", "from_pretrained", "saved_compression",
           "supported_classes"]
