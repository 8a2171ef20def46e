"""LLaVA models. Importing this package registers ``llava_llama`` with AutoConfig / AutoModelForCausalLM."""
from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "LlavaLlamaModel"]
