"""Qwen-VL(-Chat) natively: ``QwenVLForCausalLM`` loads the hub's remote-code state dict key for key
(``transformer.wte``, ``transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.w1,mlp.w2,mlp.c_proj}``,
``transformer.ln_f``, ``transformer.visual.*``, ``lm_head``) without executing remote code.

Facts from the hub's ``modeling_qwen.py`` (Qwen/Qwen-VL-Chat; read in the vendored copies
HyeonjeongHa/MM-PoisonRAG@ad21166 and Stevetich/RVP@6ae8715 ``Qwen-VL-Chat/modeling_qwen.py``; docs/qwen_vl.md):

- block: ``ln_1`` (RMSNorm, computed in float32) -> attention -> residual -> ``ln_2`` -> SwiGLU MLP
  ``c_proj(w1(x) * silu(w2(x)))`` (``intermediate_size // 2`` wide) -> residual; ``ln_f``; ``lm_head``;
- attention: ``c_attn`` (with bias) split at hidden_size into q, k, v; rotary (rotate-half, on
  ``kv_channels * rotary_pct`` dims, float32, base ``rotary_emb_base``) at positions 0 .. L-1 of the cache;
  log-n scaling of the queries past ``seq_length`` (``use_logn_attn``); dynamic NTK (``use_dynamic_ntk``):
  the rotary base is multiplied by alpha^(d / (d - 2)), alpha = max(2^ceil(log2(L / seq_length) + 1) - 1, 1)
  from the prefill's length L, kept for the decoding steps; eager softmax attention with the causal and
  padding masks added (``finfo.min``);
- images: the ``<img>`` .. ``</img>`` span's inner positions (``n_queries`` = 256 of them) are overwritten
  by the image's 256 visual tokens (``transformer.visual``).

What differs, and why ([VisionZip-LLaVA] tags in the code):

- attention is SDPA (the official is eager); the KV cache is transformers' ``DynamicCache`` (``cache=``);
- positions come from the attention mask (each sample counts 0.. from its first real token), so a
  left-padded batch equals its samples run one by one; the official rotates by the index in the padded
  batch (``position_ids`` are ignored by its rotary), so its batched answers shift with the padding. Without
  padding the two are the same positions;
- an image is an ``IMAGE_TOKEN_INDEX`` placeholder between ``<img>`` and ``</img>`` (``llava.model.qwen_vl.
  processor``), replaced by as many visual tokens as the image has after compression; with none the
  LLM input is the official one (``<img>``, 256 visual tokens, ``</img>``). With compression the image span
  shrinks and the tokens after it are renumbered: Qwen-VL's 1D RoPE gives the kept queries consecutive
  positions, as the LLaVA families here;
- in-LLM methods (FastV, PDrop, ...) run ``visionzip.decoder_loop.pruned_decoder_forward``, the loop of every
  family, on these blocks (``_pruned_forward``; the blocks answer to the names and the layer call it uses).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.splice import splice_image_features_on_device, spliced_length
from llava.preflight import check_prompts_fit, model_max_positions
from visionzip import CompressionConfig
from visionzip.decoder_loop import pruned_decoder_forward, pruned_prefix
from visionzip.llm import LLMTokenPruner
from visionzip.pipeline import encode_views

from .compression import QwenResamplerQueries, check_qwen_vl_compression
from .config import QwenVLConfig
from .visual import QwenVisionTransformer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def ntk_alpha(length: int, seq_length: int) -> float:
    """The official dynamic-NTK alpha for a prefill of ``length`` positions (1 up to ``seq_length``)."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


class QwenRotary(nn.Module):
    """cos / sin (B, L, 1, d) at given positions, float32, for a dynamic-NTK alpha."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim = dim
        self.base = base
        # the official keeps the alpha of the last prefill (``_ntk_alpha_cached``) for the decoding steps
        self.ntk_alpha_cached = 1.0

    def forward(self, position_ids: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base * alpha ** (self.dim / (self.dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, device=position_ids.device).float() / self.dim))
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t (B, L, H, d): rotary on its first cos.shape[-1] dims, in float32, back to t's dtype."""
    rot = cos.shape[-1]
    t_rot, t_pass = t[..., :rot].float(), t[..., rot:].float()
    t_rot = t_rot * cos + rotate_half(t_rot) * sin
    return torch.cat((t_rot, t_pass), dim=-1).type_as(t)


class QwenAttention(nn.Module):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.kv_channels * config.num_attention_heads)
        self.c_proj = nn.Linear(config.hidden_size, config.kv_channels * config.num_attention_heads, bias=not config.no_bias)

    # the query / key projections alone (slices of ``c_attn``), as the in-LLM methods' scoring reads them
    # (``visionzip.decoder_loop.score_rows`` / ``score_keys`` call ``q_proj`` / ``k_proj``)
    def q_proj(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.c_attn.weight[: self.hidden_size], self.c_attn.bias[: self.hidden_size])

    def k_proj(self, x: torch.Tensor) -> torch.Tensor:
        rows = slice(self.hidden_size, 2 * self.hidden_size)
        return F.linear(x, self.c_attn.weight[rows], self.c_attn.bias[rows])

    def forward(self, hidden, cos, sin, logn, mask, cache):
        """mask: an additive float or a boolean (True: attend) (B, 1, L, past + L) mask, or None (causal)."""
        bsz, length, _ = hidden.shape
        q, k, v = self.c_attn(hidden).split(self.hidden_size, dim=2)
        q, k, v = (x.view(bsz, length, self.num_heads, self.head_dim) for x in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if logn is not None:
            q = q * logn.to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # [VisionZip-LLaVA] SDPA with the combined causal + padding mask (the official: eager softmax)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and length > 1)
        return self.c_proj(out.transpose(1, 2).reshape(bsz, length, self.hidden_size))


class QwenMLP(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


def logn_scale(position_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """(B, L) positions -> (B, L, 1, 1) the official log-n query scale: log_{seq_length}(position + 1) past
    ``seq_length``, else 1."""
    pos = position_ids.float() + 1
    scale = torch.where(pos > seq_length, torch.log(pos) / math.log(seq_length), torch.ones_like(pos))
    return scale[:, :, None, None]


class QwenBlock(nn.Module):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QwenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QwenMLP(config)
        self.seq_length = config.seq_length if config.use_logn_attn else None

    # ``ln_1`` and ``attn`` under the names the decoder loop's scoring reads (``visionzip.decoder_loop``)
    @property
    def input_layernorm(self) -> RMSNorm:
        return self.ln_1

    @property
    def self_attn(self) -> QwenAttention:
        return self.attn

    def forward(self, hidden, cos=None, sin=None, logn=None, mask=None, cache=None, *, attention_mask=None,
                position_embeddings=None, position_ids=None, use_cache=None):
        """Ours: (hidden, cos, sin, logn, mask, cache). The decoder loop's (``visionzip.decoder_loop``, the
        transformers layer call): ``attention_mask`` (boolean or None), ``position_embeddings`` (cos, sin)
        (B, L, d), ``position_ids`` (B, L) (for the log-n scale), ``cache``."""
        if position_embeddings is not None:
            cos, sin = (t.unsqueeze(2) for t in position_embeddings)
            mask = attention_mask
            if self.seq_length is not None and position_ids is not None and not self.training:
                logn = logn_scale(position_ids, self.seq_length)
        hidden = hidden + self.attn(self.ln_1(hidden), cos, sin, logn, mask, cache)
        return hidden + self.mlp(self.ln_2(hidden))


class QwenVLPreTrainedModel(PreTrainedModel):
    config_class = QwenVLConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["QwenBlock", "VisualAttentionBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # checkpoints carry every weight; fresh models (tests, the tiny builder) are initialised there
        return


class QwenVLModel(QwenVLPreTrainedModel):
    """``transformer``: embeddings, blocks, final norm and the vision side (``visual``)."""

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList([QwenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        rotary_dim = int(config.kv_channels * config.rotary_pct)
        self.rotary = QwenRotary(rotary_dim, config.rotary_emb_base)
        self.visual = QwenVisionTransformer(**config.visual)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    # the decoder loop's view (``visionzip.decoder_loop.pruned_decoder_forward``): layers, final norm, rotary
    @property
    def layers(self) -> nn.ModuleList:
        return self.h

    @property
    def norm(self) -> RMSNorm:
        return self.ln_f

    def rotary_emb(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (B, L, d) in ``x``'s dtype at ``position_ids`` (B, L), the prefill's NTK alpha."""
        cos, sin = self.rotary(position_ids, self.rotary.ntk_alpha_cached)
        return cos.squeeze(2).to(x.dtype), sin.squeeze(2).to(x.dtype)

    def start_prefill(self, length: int) -> None:
        """The official dynamic-NTK alpha of a prefill of ``length`` positions (kept for its decoding steps)."""
        config = self.config
        self.rotary.ntk_alpha_cached = ntk_alpha(length, config.seq_length) if config.use_dynamic_ntk else 1.0

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None):
        """inputs_embeds (B, L, C); attention_mask (B, past + L) 1 for real tokens (None: all);
        position_ids (B, L) (None: counted from the mask). Returns (B, L, C) after ``ln_f``."""
        bsz, length, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(bsz, past + length, dtype=torch.long, device=device)
        if position_ids is None:
            # [VisionZip-LLaVA] positions count real tokens only (module docstring)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        config = self.config
        if past == 0:
            # the official alpha: from the prefill's (padded) length, kept for the decoding steps
            self.start_prefill(length)
        cos, sin = self.rotary(position_ids, self.rotary.ntk_alpha_cached)
        logn = logn_scale(position_ids, config.seq_length) if config.use_logn_attn and not self.training else None
        keys = torch.arange(past + length, device=device)
        causal = keys[None, :] <= (past + torch.arange(length, device=device))[:, None]  # (L, past + L)
        allowed = causal[None] & attention_mask.bool()[:, None, :]
        dtype = inputs_embeds.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None]
        hidden = inputs_embeds
        for block in self.h:
            hidden = block(hidden, cos, sin, logn, mask, cache)
        return self.ln_f(hidden)


class ImageFeatures:
    """What ``get_image_features`` returns: ``per_image``, one (T, hidden) tensor per image."""

    def __init__(self, per_image: list[torch.Tensor]):
        self.per_image = per_image


class QwenVLForCausalLM(QwenVLPreTrainedModel, GenerationMixin):
    """Qwen-VL(-Chat): ``forward(input_ids, attention_mask, images=...)`` and ``generate(inputs, images=...)``,
    with ``IMAGE_TOKEN_INDEX`` where an image's visual tokens go (module docstring), visual tokens compressed
    per ``config.visual_compression`` (``set_visual_compression``)."""

    _tied_weights_keys: dict = {}

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.transformer = QwenVLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def default_conv_mode(self) -> str:
        """The checkpoint's prompt format: ``qwen_chatml`` (Qwen-VL-Chat) or ``qwen_vqa`` (Qwen-VL, chat_format raw)."""
        from .processor import default_conv_mode

        return default_conv_mode(self.config)

    def build_processor(self, tokenizer, image_processor, conv_mode: str | None = None):
        """The processor front-ends build this model's inputs with (``conv_mode`` None: the checkpoint's)."""
        from .processor import QwenVLProcessor

        return QwenVLProcessor.from_model(self, tokenizer, image_processor, conv_mode)

    # ----- compression ---------------------------------------------------------------------------------
    def get_visual_compression(self) -> CompressionConfig:
        """The configured compression (``config.visual_compression``; absent: none), parsed once and cached."""
        raw = getattr(self.config, "visual_compression", None)
        cached = self.__dict__.get("_visual_compression_cache")
        if cached is not None and cached[0] == raw:
            return cached[1]
        config = CompressionConfig.from_dict(raw)
        self.__dict__["_visual_compression_cache"] = (dict(raw) if isinstance(raw, dict) else raw, config)
        return config

    def set_visual_compression(self, config):
        """Set the compression (a ``CompressionConfig``, its dict, a spec string, or None): checked against the
        256 resampler queries before anything changes (a ValueError naming the method, value and limit), then
        stored in ``config.visual_compression`` (saved with the model)."""
        if config is not None and not isinstance(config, (CompressionConfig, dict, str)):
            raise ValueError(f"expected a CompressionConfig, dict, spec string or None, got {type(config).__name__}")
        config = CompressionConfig.parse(config).validate()
        check_qwen_vl_compression(self.query_adapter(), config, int(self.config.num_hidden_layers))
        self.config.visual_compression = config.to_dict()
        return self

    def llm_pruner(self) -> LLMTokenPruner | None:
        """The in-LLM pruning schedule of the configured compression (None for vision-side methods / none);
        budgets per image of ``n_queries`` visual tokens."""
        compression = self.get_visual_compression()
        if not compression.enabled or compression.settings.stage != "llm":
            return None
        return compression.settings.llm_pruner(
            int(self.config.num_hidden_layers), view_tokens=self.transformer.visual.num_queries
        )

    def query_adapter(self) -> QwenResamplerQueries:
        """The vision side seen by the compression methods: a sequence of ``n_queries`` resampler queries."""
        return QwenResamplerQueries(self.transformer.visual)

    def visual_tokens_per_image(self) -> int:
        """Visual tokens each image puts into the LLM's input (in-LLM methods drop theirs later)."""
        compression = self.get_visual_compression()
        queries = self.transformer.visual.num_queries
        return queries if not compression.enabled else int(compression.settings.llm_input_tokens_per_view(queries))

    # ----- the image pipeline ------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixels -> (N, T, hidden) visual tokens: all 256 queries (``visual.forward``), or the
        configured method's selection over the queries, then ``ln_post`` and ``proj``."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"Qwen-VL images must be a (N, 3, S, S) tensor, got {shape}")
        visual = self.transformer.visual
        compression = self.get_visual_compression()
        if not compression.enabled or compression.settings.stage == "llm":
            return visual(pixel_values)
        adapter = self.query_adapter()
        adapter.check_pixels(pixel_values)
        # the one visual-token pipeline (visionzip.pipeline) over the resampler's queries (the adapter's views)
        return visual.project(encode_views(adapter, pixel_values, -1, compression.settings).tokens)

    def get_image_features(self, pixel_values, image_sizes=None) -> ImageFeatures:
        return ImageFeatures(list(self.encode_images(pixel_values).unbind(0)))

    def splice(self, input_ids, images, attention_mask=None, host_input_ids=None, host_attention_mask=None):
        """Text embeddings with each image's visual tokens in place of its ``IMAGE_TOKEN_INDEX`` (left padded):
        (inputs_embeds, attention_mask, position_ids, visual_mask (B, W) bool where visual tokens sit)."""
        features = self.get_image_features(images).per_image
        sizes = [f.shape[0] for f in features]
        ids = host_input_ids if host_input_ids is not None else input_ids.cpu()
        mask = host_attention_mask if host_input_ids is not None else (None if attention_mask is None else attention_mask.cpu())
        length = spliced_length(ids, mask, sizes)
        out = splice_image_features_on_device(
            input_ids, features, self.transformer.wte, attention_mask, None, "left", length=length
        )
        return out.inputs_embeds, out.attention_mask, out.position_ids, out.visual_mask

    # ----- forward / generate --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | None = None,
        image_sizes=None,
        logits_to_keep: int = 0,
        host_input_ids: torch.Tensor | None = None,
        host_attention_mask: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """visual_mask (B, L) bool: where the visual tokens of ``inputs_embeds`` sit (the splice's; in-LLM
        methods prune among them in the prefill)."""
        if inputs_embeds is None and images is not None and input_ids is not None and input_ids.shape[1] > 1:
            inputs_embeds, attention_mask, position_ids, visual_mask = self.splice(
                input_ids, images, attention_mask, host_input_ids, host_attention_mask
            )
            input_ids = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            if bool((input_ids < 0).any()):
                raise ValueError("input_ids hold image placeholders (IMAGE_TOKEN_INDEX) but no images were given")
            inputs_embeds = self.transformer.wte(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        pruner = self.llm_pruner()
        if visual_mask is None or visual_mask.shape != inputs_embeds.shape[:2]:
            visual_mask = None  # decoding steps: nothing to prune
        if (pruner is not None and visual_mask is not None) or pruned_prefix(cache) is not None:
            hidden = self._pruned_forward(inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask, pruner)
        else:
            hidden = self.transformer(inputs_embeds, attention_mask, position_ids, cache if use_cache else None)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def _pruned_forward(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask, pruner):
        """The decoder stack with in-LLM token pruning: ``visionzip.decoder_loop.pruned_decoder_forward``, the
        loop every family's in-LLM methods run, on this model's own blocks (their transformers-style call:
        SDPA, boolean masks, the rotary tables of ``rotary_emb``, log-n from the positions). Returns the hidden
        states after ``ln_f`` of the tokens left after the last drop (the last token, a text token, stays last)."""
        length = inputs_embeds.shape[1]
        if position_ids is None and attention_mask is not None:
            # over the caller's index space (the loop counts a cache's dropped tokens there too); without a
            # mask (generate drops an all-ones one) the loop numbers past .. past + length - 1 itself
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        if cache is None or cache.get_seq_length() == 0:
            self.transformer.start_prefill(length)
        out = pruned_decoder_forward(
            self.transformer, inputs_embeds, attention_mask, position_ids, cache if use_cache else None, use_cache,
            visual_mask, pruner,
        )
        return out.last_hidden_state

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """Each step's inputs: the spliced embeddings at the prefill, then the last token; positions come
        from the attention mask (``QwenVLModel.forward``)."""
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0 and inputs_embeds is not None:
            model_inputs = {"inputs_embeds": inputs_embeds, "visual_mask": kwargs.get("visual_mask")}
        else:
            model_inputs = {"input_ids": input_ids[:, -1:]}
        model_inputs.update(cache=cache, attention_mask=attention_mask, use_cache=kwargs.get("use_cache", True))
        return model_inputs

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Generate from token ids with ``IMAGE_TOKEN_INDEX`` where each image goes and the images' pixels
        (N, 3, S, S): returns only the new tokens. Batches are left padded. A prompt that leaves no room for
        a reply within the model's positions is refused by name (``llava.preflight.check_prompts_fit``)."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs `inputs` (token ids, IMAGE_TOKEN_INDEX where images go)")
        host_input_ids = kwargs.pop("host_input_ids", None)
        host_attention_mask = kwargs.pop("host_attention_mask", None)
        kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if images is not None:
            inputs_embeds, attention_mask, _, visual_mask = self.splice(
                inputs, images, attention_mask, host_input_ids, host_attention_mask
            )
            if self.llm_pruner() is not None:
                kwargs["visual_mask"] = visual_mask  # the prefill's in-LLM drops need to know where they are
        else:
            if bool((inputs == IMAGE_TOKEN_INDEX).any()):
                raise ValueError("the prompt has image placeholders but no images were given")
            inputs_embeds = self.transformer.wte(inputs)
            if attention_mask is None:
                attention_mask = torch.ones(inputs.shape, dtype=torch.long, device=inputs.device)
        room = check_prompts_fit([int(inputs_embeds.shape[1])], kwargs.get("max_new_tokens"), model_max_positions(self.config))
        if kwargs.get("max_new_tokens") is not None:
            kwargs["max_new_tokens"] = room
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
