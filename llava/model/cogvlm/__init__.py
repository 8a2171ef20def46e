"""CogVLM (cogvlm-chat-v1.1) natively: the hub's remote-code checkpoints loaded key for key, with
VisionZip / VisPruner (and the other vision-side methods) on its EVA2-CLIP-E tower. ``docs/cogvlm.md``."""
from .config import CogVLMConfig
from .modeling import CogVLMForCausalLM, UnsupportedCompression
from .processor import CogVLMImageProcessor, CogVLMProcessor

__all__ = ["CogVLMConfig", "CogVLMForCausalLM", "CogVLMImageProcessor", "CogVLMProcessor", "UnsupportedCompression"]
