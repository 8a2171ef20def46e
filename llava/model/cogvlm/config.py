"""CogVLM's configuration, read from the hub checkpoint's own ``config.json`` (THUDM/cogvlm-chat-hf).

The remote code's ``configuration_cogvlm.py`` (``CogVLMConfig``) has the LLaMA keys of the language model
(``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``rms_norm_eps``,
``max_position_embeddings``, ``vocab_size``, ``hidden_act``), ``template_version`` ("chat" for
cogvlm-chat-v1.1, "base" / "vqa" for the other checkpoints) and ``vision_config`` as a plain dict with the
EVA2-CLIP-E keys (``hidden_size`` 1792, ``num_hidden_layers`` 63, ``num_heads`` 16, ``intermediate_size``
15360, ``patch_size`` 14, ``image_size`` 490, ``num_positions`` 1226, ``in_channels`` 3, ``hidden_act``
"gelu", ``layer_norm_eps`` 1e-6, ``dropout_prob`` 0). The same key names are used here, so the hub's
``config.json`` loads as is; ``visual_compression`` (our ``CompressionConfig`` dict) is added and saved
with the model.
"""
from __future__ import annotations

from types import SimpleNamespace

from transformers import PretrainedConfig

MODEL_TYPE = "cogvlm"
TEMPLATE_VERSIONS = ("base", "chat", "vqa")
# cogvlm-chat-hf's vision_config (EVA2-CLIP-E as CogVLM uses it: its last layer removed, 63 layers)
EVA2_CLIP_E = {
    "dropout_prob": 0.0,
    "hidden_act": "gelu",
    "in_channels": 3,
    "num_hidden_layers": 63,
    "hidden_size": 1792,
    "patch_size": 14,
    "num_heads": 16,
    "intermediate_size": 15360,
    "layer_norm_eps": 1e-06,
    "num_positions": 1226,
    "image_size": 490,
}


class CogVLMConfig(PretrainedConfig):
    """The hub's CogVLM configuration (see the module docstring); defaults are cogvlm-chat-v1.1's."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-06,
        template_version: str = "chat",
        vision_config: dict | None = None,
        visual_compression: dict | None = None,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        if template_version not in TEMPLATE_VERSIONS:
            raise ValueError(f"template_version must be one of {TEMPLATE_VERSIONS}, got {template_version!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.template_version = template_version
        self.vision_config = dict(EVA2_CLIP_E if vision_config is None else vision_config)
        self.visual_compression = visual_compression
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        vision = self.vision_namespace()
        if vision.hidden_size % vision.num_heads:
            raise ValueError(
                f"vision_config hidden_size {vision.hidden_size} is not a multiple of its num_heads {vision.num_heads}"
            )
        if vision.image_size % vision.patch_size:
            raise ValueError(f"vision_config image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
        patches = (vision.image_size // vision.patch_size) ** 2
        if vision.num_positions != patches + 1:
            raise ValueError(
                f"vision_config num_positions {vision.num_positions} != {patches} patches + 1 CLS of a "
                f"{vision.image_size} px image in {vision.patch_size} px patches"
            )

    def vision_namespace(self) -> SimpleNamespace:
        """``vision_config`` as attributes (the remote code's ``Namespace(**config.vision_config)``)."""
        missing = sorted(set(EVA2_CLIP_E) - set(self.vision_config))
        if missing:
            raise ValueError(f"vision_config lacks the keys {missing} (an EVA2-CLIP vision_config has {sorted(EVA2_CLIP_E)})")
        return SimpleNamespace(**self.vision_config)

    @property
    def num_patches(self) -> int:
        vision = self.vision_namespace()
        return (vision.image_size // vision.patch_size) ** 2

    @property
    def vision_token_num(self) -> int:
        """Image positions in the LLM's sequence, uncompressed: boi + patches + eoi (1227 on cogvlm-chat)."""
        return self.num_patches + 2
