"""The compression-aware processor: a Hugging Face processor whose ``<image>`` expansion is the
compressed feature count, so that ``input_ids`` carry exactly as many placeholders as the compressed
model produces features (the LLM sees only the kept tokens).

``compression_aware_processor(processor, model)`` returns a shallow copy of ``processor`` whose
``replace_image_token`` / ``replace_video_token`` (the hooks transformers' processors use to expand each
placeholder) write the count the model's family computes for that image or video; the caller's processor
is left unchanged.
"""
from __future__ import annotations

import copy
from types import MethodType

from .base import current_compression, family_of
from .loading import saved_but_not_applied


def compression_aware_processor(processor, model):
    """A copy of ``processor`` that expands ``<image>`` to the compressed count of ``model`` (to which
    ``visionzip.apply_compression`` was applied). Without compression on the model, or with an in-LLM method (stage ``llm``: the
    LLM's input keeps the uncompressed count): ``processor`` itself."""
    family = family_of(model)
    config = current_compression(model)
    missing = saved_but_not_applied(model)
    if missing is not None:
        raise ValueError(
            f"the model's config.json names the compression {missing.spec()!r}, but it is not applied to this "
            "instance (transformers' from_pretrained does not apply it): load with "
            "visionzip.hf.from_pretrained(PATH), or call visionzip.apply_compression(model, "
            "model.config.visual_compression) -- or apply_compression(model, 'none') to run it uncompressed"
        )
    if not config.enabled or config.settings.stage == "llm":
        return processor  # in-LLM methods: the LLM's input keeps every visual token (llm_input_tokens_per_view)
    if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_token"):
        raise TypeError(
            f"{type(processor).__name__} is not a transformers image-text processor (it has no image_token / "
            "replace_image_token)"
        )
    settings = config.settings
    aware = copy.copy(processor)
    for modality in family.modalities:
        hook = f"replace_{modality.name}_token"
        if not hasattr(processor, hook) or not hasattr(processor, f"{modality.name}_token"):
            continue

        def replace_token(self, inputs: dict, *args, _modality=modality, **kwargs) -> str:
            # transformers calls replace_image_token(inputs, image_idx=i) / replace_video_token(inputs, video_idx=i)
            index = args[0] if args else kwargs[f"{_modality.name}_idx"]
            counts = _modality.counts(model, settings, inputs)
            if _modality.placeholder_text is not None:  # a family whose placeholder has delimiters (InternVL)
                return _modality.placeholder_text(self, counts[index])
            return getattr(self, f"{_modality.name}_token") * counts[index]

        setattr(aware, hook, MethodType(replace_token, aware))
    aware.visual_compression = config.to_dict()
    return aware
