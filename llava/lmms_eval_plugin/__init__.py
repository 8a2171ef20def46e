"""lmms-eval plugin: this codebase's compressed models as lmms-eval models.

Two models are registered through lmms-eval's entry-point group ``lmms_eval.models`` (lmms-eval >= 0.7
reads it in ``lmms_eval.models.registry_v2.ModelRegistryV2.load_entrypoint_manifests``; ``setup.py``
declares the entry point, so installing this project next to lmms-eval is the whole registration):

- ``visionzip_llava``: an original-format LLaVA checkpoint loaded by ``llava.model.builder.load_pretrained_model``
  and prompted through ``llava.processor.LlavaProcessor`` (this codebase's stack); a natively implemented
  family's checkpoint (CogVLM, Qwen-VL) loads the same way and is prompted through the processor its model
  builds (``llava.eval.model_processor``);
- ``visionzip_hf``: a llava-hf checkpoint in its transformers class (``AutoModelForImageTextToText``), with
  ``visionzip.apply_compression`` and the compression-aware processor ``visionzip.hf.compression_aware_processor``.

Both take ``--model_args pretrained=PATH,compression=visionzip:64`` (any ``--compression`` spec; a spec with
settings goes in quotes: ``compression="visionzip:dominant=54,contextual=10"``), answer ``generate_until``
requests in batches of ``--batch_size``, and log the compression they ran (budget and measured visual tokens)
into the results' ``throughput`` block. See docs/evaluation.md, section "lmms-eval".

This package imports nothing from lmms-eval at import time (the training environment does not have it);
``models`` does, and is only imported by lmms-eval.
"""
from __future__ import annotations

MODEL_CLASSES = {
    "visionzip_llava": "llava.lmms_eval_plugin.models.VisionZipLlava",
    "visionzip_hf": "llava.lmms_eval_plugin.models.VisionZipHF",
}


def manifests():
    """The entry point's payload: one ``ModelManifest`` per model (simple models: lmms-eval builds the
    prompt text, the model applies its own template)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in MODEL_CLASSES.items()]
