"""LLaVA models. Importing this package registers ``llava_llama`` and ``llava_mistral`` with AutoConfig /
AutoModelForCausalLM."""
from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel
from .language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "LlavaLlamaModel", "LlavaMistralConfig", "LlavaMistralForCausalLM"]
