"""``QwenVLConfig``: the hub's remote-code ``QWenConfig`` (``model_type`` "qwen") read natively.

The fields and defaults are those of Qwen/Qwen-VL-Chat's ``configuration_qwen.py`` and ``config.json``
(docs/qwen_vl.md): a Qwen-7B LLM (``hidden_size`` 4096, 32 layers of 32 heads of ``kv_channels`` 128,
``intermediate_size`` 22016 = 2 x the SwiGLU width, RMSNorm ``layer_norm_epsilon`` 1e-6, rotary on every
head dimension, ``rotary_emb_base`` 10000, dynamic NTK and log-n attention scaling past ``seq_length`` 2048,
no biases but ``c_attn``'s) and ``visual``, the kwargs of ``visual.VisionTransformer`` (OpenCLIP ViT-bigG:
448 px, 14 px patches, width 1664, 48 layers, 16 heads, ``mlp_ratio`` 4.9231; a resampler of ``n_queries``
256 learned queries into ``output_dim`` 4096; ``image_start_id`` 151857 = ``<img>``).

Flags of the remote code that choose its kernels (``bf16`` / ``fp16`` / ``fp32``, ``use_flash_attn``,
``onnx_safe``) are kept as read and not used: the dtype comes from the loader, attention is SDPA.
``visual_compression`` (our ``CompressionConfig`` dict) is saved with the model, as on our other families.
"""
from __future__ import annotations

from transformers import PretrainedConfig

DEFAULT_VISUAL = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}
DEFAULT_QUERIES = 256  # visual.VisionTransformer's n_queries default (absent from the hub's config.json)


class QwenVLConfig(PretrainedConfig):
    model_type = "qwen"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        kv_channels: int = 128,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: bool | str = False,
        intermediate_size: int = 22016,
        no_bias: bool = True,
        tie_word_embeddings: bool = False,
        seq_length: int = 2048,
        visual: dict | None = None,
        visual_compression: dict | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.bf16, self.fp16, self.fp32 = bf16, fp16, fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.intermediate_size = intermediate_size
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.visual = dict(DEFAULT_VISUAL if visual is None else visual)
        if visual_compression is not None:
            self.visual_compression = visual_compression
        kwargs.setdefault("eos_token_id", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check()

    def check(self) -> None:
        """The geometry the remote code asserts or silently assumes, as clear errors."""
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            # the remote code splits c_attn's output at hidden_size and its heads at hidden_size / heads
            raise ValueError(
                f"kv_channels x num_attention_heads = {self.kv_channels} x {self.num_attention_heads} must equal "
                f"hidden_size = {self.hidden_size} (Qwen-VL's attention splits its projections at hidden_size)"
            )
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        visual = self.visual
        missing = [k for k in ("heads", "image_size", "layers", "mlp_ratio", "output_dim", "patch_size", "width", "image_start_id") if k not in visual]
        if missing:
            raise ValueError(f"config.visual lacks {missing} (the kwargs of Qwen-VL's VisionTransformer)")
        if int(visual["output_dim"]) != self.hidden_size:
            raise ValueError(
                f"visual.output_dim = {visual['output_dim']} must equal hidden_size = {self.hidden_size}: the "
                "resampler's outputs are written into the LLM's hidden states"
            )
        if int(visual["output_dim"]) < 128:
            raise ValueError(f"visual.output_dim = {visual['output_dim']}: the resampler has output_dim // 128 heads, at least one")
        side = round(self.num_queries**0.5)
        if side * side != self.num_queries:
            raise ValueError(f"visual.n_queries = {self.num_queries} must be a square (the queries' 2D sin-cos grid)")
        if int(visual["image_size"]) % int(visual["patch_size"]):
            raise ValueError(f"visual.image_size {visual['image_size']} is not a multiple of patch_size {visual['patch_size']}")

    @property
    def num_queries(self) -> int:
        return int(self.visual.get("n_queries", DEFAULT_QUERIES))

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])
