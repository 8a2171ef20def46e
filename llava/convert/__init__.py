"""Convert between original LLaVA checkpoints and the llava-hf format (``transformers``' own
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``), at the file level: configs and
tensors are renamed, no model is instantiated, so a 7B checkpoint converts in the memory of its weights.

``python -m llava.convert to-hf SRC DST [--model-base BASE]``
    SRC: an original checkpoint (``llava_llama`` / ``llava_mistral``), full, or projector-only
    (``mm_projector.bin`` / ``.safetensors``, e.g. a VisionZip‡ projector tuned on a base) on ``--model-base``.
    ``image_aspect_ratio: anyres`` gives LLaVA-NeXT, anything else LLaVA (1.5).
``python -m llava.convert to-llava SRC DST [--projector-only]``
    SRC: a llava-hf folder; DST: an original checkpoint, its vision tower saved in ``DST/<tower>/`` and named
    relatively in ``mm_vision_tower``; ``--projector-only`` writes ``mm_projector.safetensors`` + config only.

What the mapping does (llava-hf naming of transformers 5):

- LLM: ``model.{embed_tokens,layers,norm}`` <-> ``model.language_model.*``; ``lm_head`` as is;
- projector ``mlp2x_gelu``: ``model.mm_projector.{0,2}`` <-> ``model.multi_modal_projector.linear_{1,2}``;
- vision tower: taken from the folder ``mm_vision_tower`` names (as the original LLaVA loads it; the copy
  inside released checkpoints is ignored, as the original does) <-> ``model.vision_tower.*``;
- ``model.image_newline`` as is (LLaVA-NeXT);
- the ``<image>`` placeholder: the original splices at id -200 and has no such token; llava-hf needs one,
  so ``to-hf`` appends it at id = vocab size, with the mean input embedding and the mean ``lm_head`` row
  (its logit is the mean of the others, so it never wins a greedy step); ``to-llava`` drops that row;
- ``mm_vision_select_layer`` <-> ``vision_feature_layer``; ``mm_vision_select_feature`` patch / cls_patch
  <-> ``vision_feature_select_strategy`` default / full;
- ``image_grid_pinpoints``: the original reads each pair as (width, height), transformers as (height,
  width): the pairs are transposed, so both pick the same crop grid for the same image.
"""
from __future__ import annotations

from .core import to_hf, to_llava

__all__ = ["to_hf", "to_llava"]
