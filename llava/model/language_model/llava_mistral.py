"""LLaVA on a Mistral language model (LLaVA-NeXT ``llava-v1.6-mistral-7b``): ``LlavaMistralConfig``
(``model_type`` "llava_mistral") and ``LlavaMistralForCausalLM``, registered with ``AutoConfig`` /
``AutoModelForCausalLM``. Prompts use the ``mistral_instruct`` template (``CONV_MODE``).

[VisionZip-LLaVA] The original LLaVA builds this on transformers' ``MistralForCausalLM``. A Mistral
decoder without a sliding window is the LLaMA decoder with other sizes: the same parameter names
(``q/k/v/o_proj``, ``gate/up/down_proj``, RMS norms, rotary embedding), the same computation. So the class
reuses ``LlavaLlamaForCausalLM`` as a whole, with its image pipeline, compression and in-LLM pruning; a
checkpoint whose ``sliding_window`` is shorter than its context (Mistral-7B v0.1) is refused by name,
since LLaMA layers would attend beyond the window. Mistral-7B-Instruct-v0.2, the base of
llava-v1.6-mistral-7b, has ``sliding_window: null``.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .llava_llama import LlavaConfig, LlavaLlamaForCausalLM

CONV_MODE = "mistral_instruct"


class LlavaMistralConfig(LlavaConfig):
    """A Mistral config (``sliding_window`` included) plus LLaVA's ``mm_*`` keys."""

    model_type = "llava_mistral"

    def __init__(self, sliding_window: int | None = None, **kwargs):
        self.sliding_window = sliding_window
        super().__init__(**kwargs)


def check_sliding_window(config) -> None:
    window = getattr(config, "sliding_window", None)
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if window is not None and window < context:
        raise ValueError(
            f"sliding_window={window} is shorter than max_position_embeddings={context}: llava_mistral runs "
            "full-attention layers (Mistral-7B-Instruct-v0.2, the base of llava-v1.6-mistral, has no window)"
        )


class LlavaMistralForCausalLM(LlavaLlamaForCausalLM):
    """``LlavaLlamaForCausalLM`` on a Mistral checkpoint (module docstring)."""

    config_class = LlavaMistralConfig

    def __init__(self, config):
        check_sliding_window(config)
        super().__init__(config)


AutoConfig.register("llava_mistral", LlavaMistralConfig)
AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM)
