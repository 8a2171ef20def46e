"""vLLM serving plugin: visual-token compression inside vLLM's own engine (docs/serving.md).

vLLM loads out-of-tree plugins from the ``vllm.general_plugins`` entry-point group (setup.py names
``register`` below) in every process it starts. ``register`` adds model classes to vLLM's registry by
import path only, so neither ``import visionzip`` nor the plugin load imports vLLM or the model code; vLLM
imports ``visionzip.vllm.llava`` when a model selects the architecture:

    vllm serve PATH --hf-overrides '{"architectures": ["VisionZipLlavaForConditionalGeneration"],
                                     "visual_compression": "visionzip:64"}'

``visual_compression`` is the key ``visionzip.apply_compression`` persists in a Hugging Face
``config.json``: a checkpoint saved compressed needs only the ``architectures`` override. LLaVA-NeXT checkpoints
select ``VisionZipLlavaNextForConditionalGeneration`` (``visionzip.vllm.llava_next``: the budget per view),
Qwen2.5-VL checkpoints ``VisionZipQwen2_5_VLForConditionalGeneration`` (``visionzip.vllm.qwen2_5_vl``: the budget
per image, the kept tokens at their original M-RoPE positions).
"""
from __future__ import annotations

# architecture name -> "module:class"; the names are ours (vLLM's own LlavaForConditionalGeneration stays
# what it is: a model is compressed only when its config selects one of these)
ARCHITECTURES = {
    "VisionZipLlavaForConditionalGeneration": "visionzip.vllm.llava:VisionZipLlavaForConditionalGeneration",
    "VisionZipLlavaNextForConditionalGeneration":
        "visionzip.vllm.llava_next:VisionZipLlavaNextForConditionalGeneration",
    "VisionZipQwen2_5_VLForConditionalGeneration":
        "visionzip.vllm.qwen2_5_vl:VisionZipQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the compressed model classes (lazily, by path)."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)
