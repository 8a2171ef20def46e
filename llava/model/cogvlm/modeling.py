"""CogVLM (cogvlm-chat-v1.1, 17B): a LLaMA-7B language model with a *visual expert* in every layer.

Loads the hub's remote-code state dict (THUDM/cogvlm-chat-hf) key for key, without running its code:
``model.embed_tokens``, ``model.layers.N.{input_layernorm, post_attention_layernorm}``,
``model.layers.N.self_attn.{language,vision}_expert_{query_key_value,dense}``,
``model.layers.N.self_attn.rotary_emb.inv_freq``, ``model.layers.N.mlp.{language,vision}_mlp.{gate,up,down}_proj``,
``model.norm``, ``model.vision.*`` (``llava.model.cogvlm.eva_clip``) and ``lm_head``.

What the remote ``modeling_cogvlm.py`` does, and where this file follows it (the same code is in the
transformers port, huggingface/transformers at 92657d1814440a90e0414544e1587471e8df85c2,
``src/transformers/models/cogvlm/modeling_cogvlm.py``, and in mindspore-lab/mindnlp at
30029a344e0668f16a18cf4026c691156c1d7675, ``mindnlp/transformers/models/cogvlm/modeling_cogvlm.py``):

- ``token_type_ids`` mark the image span (boi, patches, eoi: VISION_TOKEN_TYPE = 1); the image features
  replace the embeddings there (``index_put``);
- **expert routing** (``get_expert_mask``): a token goes through the vision expert (QKV, dense, MLP) when it
  *and the next token* are image tokens: boi and the patches do, eoi (followed by text) takes the language
  expert, as does every text token;
- **positions** (``build_position_ids``): boi and eoi advance the position like text tokens; the first
  patch advances it once and every other patch shares it. An image takes 3 positions whatever its token
  count (bos 0, boi 1, patches 2, eoi 3, text from 4);
- RoPE (GPT-NeoX rotate-half, base 10000) on those positions, a causal mask, RMSNorm, SwiGLU.

[VisionZip-LLaVA] differences, none of which changes a result:
- SDPA instead of the remote ``attention_fn``'s eager softmax (which itself calls SDPA when the mask is
  plain causal), a ``transformers.DynamicCache`` through ``cache=``, and batches;
- positions are numbered per sample from its first real token: the official ``build_position_ids`` gives a
  left-padded sample's bos position 1 instead of 0 (``y[:, 0] = 0`` and then every real token advances), so
  its batched answers differ from its one-by-one answers; ours equal the official batch-1 path in both;
- the prompt has one ``IMAGE_TOKEN_INDEX`` placeholder where the official prompt has 1227 pad ids; the
  splice expands it to the image's tokens (1227, or boi + kept + eoi under compression).

Compression (vision-side methods, ``CompressionConfig`` in ``config.visual_compression``): the method runs
on the tower's last layer through ``EVA2CLIPEncoderAdapter``; the tokens it returns go through the GLU
adapter and are framed by boi / eoi. The kept image positions are routed to the vision expert as the
official code routes its image tokens (the token types shrink with the tokens); since all patches share
one position, the text positions do not move. In-LLM methods (FastV, PDrop, SparseVLM, DART, CDPruner,
DivPrune) prune between the decoder layers through ``llava.model.cogvlm.pruning`` (the shared pruner protocol,
with each token's expert and CogVLM's positions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.constants import IMAGE_TOKEN_INDEX
from visionzip import CompressionConfig
from visionzip.encoders import EncoderCapture
from visionzip.pipeline import encode_views

from .config import CogVLMConfig
from .eva_clip import EVA2CLIPEncoderAdapter, EVA2CLIPModel
from .ops import (
    LANGUAGE_TOKEN_TYPE,
    VISION_TOKEN_TYPE,
    attention_bias,
    cogvlm_position_ids,
    rotate_half,
    route,
    vision_expert_mask,
)
from .pruning import pruned_decode_step, pruned_prefill

# CogVLM reads the tower's last layer (EVA2CLIPModel.forward: every layer, then x[:, 1:])
SELECT_LAYER = -1


class UnsupportedCompression(ValueError):
    """A compression method this family cannot run, with the reason."""


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x).to(dtype)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, x: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        return route(x, vision, self.vision_mlp, self.language_mlp, x.shape[-1])


class RotaryEmbedding(nn.Module):
    """GPT-NeoX rotate-half RoPE. ``inv_freq`` is a saved buffer, as in the remote code (its checkpoint
    holds ``rotary_emb.inv_freq`` for every layer)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) positions -> cos, sin (B, 1, L, d)."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class VisionExpertAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.rotary_emb = RotaryEmbedding(self.head_dim)
        self.vision_expert_query_key_value = nn.Linear(self.hidden_size, self.hidden_size * 3, bias=False)
        self.vision_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(self.hidden_size, self.hidden_size * 3, bias=False)
        self.language_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(self, x, vision, position_ids, attn_mask, cache):
        bsz, q_len, _ = x.shape
        qkv = route(x, vision, self.vision_expert_query_key_value, self.language_expert_query_key_value, 3 * self.hidden_size)
        q, k, v = (t.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.split(self.hidden_size, -1))
        cos, sin = self.rotary_emb.cos_sin(position_ids, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        causal = attn_mask is None and q_len > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return route(out, vision, self.vision_expert_dense, self.language_expert_dense, self.hidden_size)


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = VisionExpertAttention(config, layer_idx)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, vision, position_ids, attn_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), vision, position_ids, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x), vision)


class CogVLMModel(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)


@dataclass
class CogVLMImageFeatures:
    """per_image: one (T_i, hidden) tensor per image: boi, the (kept) image tokens, eoi."""

    per_image: list[torch.Tensor]


@dataclass
class CogVLMSplice:
    """The spliced batch, left-padded: inputs_embeds (B, L, hidden), attention_mask / token_type_ids /
    position_ids (B, L)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor


class CogVLMForCausalLM(PreTrainedModel):
    """CogVLM with the hub checkpoint's parameter names; see the module docstring."""

    config_class = CogVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["CogVLMDecoderLayer", "TransformerLayer"]
    _supports_sdpa = True

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._compression = CompressionConfig.parse(config.visual_compression).validate()
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def build_processor(self, tokenizer, image_processor, conv_mode: str | None = None, padding_side: str = "left"):
        """The processor front-ends use for this model (run_llava): CogVLM's own prompt template
        (``config.template_version``); LLaVA's ``conv_mode`` does not apply and is ignored."""
        from .processor import CogVLMProcessor

        return CogVLMProcessor.from_model(self, tokenizer, image_processor, conv_mode, padding_side)

    # ----- compression ------------------------------------------------------------------------------
    @property
    def vision_adapter(self) -> EVA2CLIPEncoderAdapter:
        return EVA2CLIPEncoderAdapter(self.model.vision)

    @property
    def visual_compression(self) -> CompressionConfig:
        return self._compression

    def set_visual_compression(self, config: CompressionConfig | dict | str | None):
        """Set the visual-token compression (``visionzip.apply_compression(model, SPEC)`` calls this): a
        ``CompressionConfig``, its dict, a spec string or None. Vision-side methods run on the tower's last
        layer (the one CogVLM reads); in-LLM methods prune between decoder layers (``llava.model.cogvlm.pruning``:
        the shared loop's protocol, with CogVLM's experts and positions), their budget per image of
        ``num_patches`` tokens. Budgets are checked now (ValueError naming the value and the limit)."""
        if config is not None and not isinstance(config, (CompressionConfig, dict, str)):
            raise ValueError(f"expected a CompressionConfig, dict, spec string or None, got {type(config).__name__}")
        config = CompressionConfig.parse(config).validate()
        if config.enabled and config.settings.stage == "llm":
            config.settings.check_llm(int(self.config.num_hidden_layers))
            config.settings.check_view(self.config.num_patches)
        elif config.enabled:
            if config.settings.stage == "tower":
                raise UnsupportedCompression(
                    f"{config.settings.name} acts inside the vision tower's own modules (a CLIP / SigLIP tower's "
                    "embeddings with interpolated positions, or its layers' attention), which EVA2-CLIP-E's remote "
                    "modules do not have; use a method on the tower's output (e.g. visionzip:64, vispruner:64)"
                )
            config.settings.check(self.vision_adapter, SELECT_LAYER)
            self._probe(config)
        self._compression = config
        self.config.visual_compression = config.to_dict()
        return self

    def _probe(self, config: CompressionConfig) -> None:
        """Run the method's ``compress`` once on a random capture of the last layer (no tower pass): a
        method that reads a CLIP tower's module names (``layer_norm1``, ``self_attn.q_proj``) instead of
        the adapter's ``queries_keys`` is refused now, naming it, rather than at the first image."""
        adapter = self.vision_adapter
        weight = self.model.vision.patch_embedding.proj.weight
        if weight.device.type == "meta":
            return
        index = adapter.layer_index(SELECT_LAYER)
        hidden = torch.randn(1, adapter.num_tokens, adapter.hidden_size, device=weight.device, dtype=weight.dtype)
        try:
            with torch.no_grad():
                config.settings.compress(adapter, EncoderCapture(hidden, hidden, index))
        except (AttributeError, NotImplementedError) as err:
            raise UnsupportedCompression(
                f"{config.settings.name} cannot run on EVA2-CLIP-E's output: it reads a CLIP tower's own modules "
                f"({err}); use visionzip, vispruner, pooling or random"
            ) from err

    # ----- the image pipeline -----------------------------------------------------------------------
    def get_image_features(self, images: torch.Tensor, image_sizes=None) -> CogVLMImageFeatures:
        """(N, 3, S, S) pixels -> per image boi + its (kept) tokens through the GLU adapter + eoi."""
        del image_sizes  # one fixed-size view per image
        vision = self.model.vision
        adapter = self.vision_adapter
        images = images.to(device=vision.boi.device)
        # the one visual-token pipeline (visionzip.pipeline): CLS dropped when nothing compresses, as CogVLM does
        method = self._compression.settings if self._compression.enabled else None
        tokens = encode_views(adapter, images, SELECT_LAYER, method).tokens
        framed = vision.frame(vision.linear_proj(tokens))
        return CogVLMImageFeatures(list(framed.unbind(0)))

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images=None) -> CogVLMSplice:
        """input_ids (B, L) with at most one ``IMAGE_TOKEN_INDEX`` per sample (where its image goes, right
        after bos in CogVLM's prompt) -> the spliced, left-padded batch with token types and positions."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
        slots = [int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in rows]
        if any(n > 1 for n in slots):
            raise ValueError(
                f"CogVLM takes at most one image per prompt (the official build_conversation_input_ids asserts "
                f"it); a prompt has {max(slots)} image placeholders"
            )
        count = 0 if images is None else int(images.shape[0])
        if sum(slots) != count:
            raise ValueError(f"the batch has {sum(slots)} image placeholders but {count} images")
        features = self.get_image_features(images).per_image if count else []
        embed = self.model.embed_tokens
        pieces, types, feature_index = [], [], 0
        for ids in rows:
            text = embed(ids.clamp(min=0))
            if (ids == IMAGE_TOKEN_INDEX).any():
                at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
                image = features[feature_index].to(text.dtype)
                feature_index += 1
                pieces.append(torch.cat([text[:at], image, text[at + 1 :]]))
                kinds = torch.full((pieces[-1].shape[0],), LANGUAGE_TOKEN_TYPE, dtype=torch.long, device=ids.device)
                kinds[at : at + image.shape[0]] = VISION_TOKEN_TYPE
            else:
                pieces.append(text)
                kinds = torch.full((text.shape[0],), LANGUAGE_TOKEN_TYPE, dtype=torch.long, device=ids.device)
            types.append(kinds)
        width = max(p.shape[0] for p in pieces)
        bsz, hidden = len(pieces), pieces[0].shape[-1]
        embeds = pieces[0].new_zeros(bsz, width, hidden)
        mask = torch.zeros(bsz, width, dtype=torch.long, device=input_ids.device)
        token_types = torch.zeros(bsz, width, dtype=torch.long, device=input_ids.device)
        for row, (piece, kinds) in enumerate(zip(pieces, types)):
            embeds[row, width - piece.shape[0] :] = piece
            mask[row, width - piece.shape[0] :] = 1
            token_types[row, width - piece.shape[0] :] = kinds
        return CogVLMSplice(embeds, mask, token_types, cogvlm_position_ids(token_types, mask))

    def llm_pruner(self):
        """The in-LLM pruner of the configured method (``visionzip.llm``), or None."""
        settings = self._compression.settings if self._compression.enabled else None
        if settings is None or settings.stage != "llm":
            return None
        return settings.llm_pruner(int(self.config.num_hidden_layers), view_tokens=self.config.num_patches)

    # ----- the language model -----------------------------------------------------------------------
    def decode(self, inputs_embeds, attention_mask, token_type_ids, position_ids, cache=None):
        """The decoder on spliced inputs (B, L, hidden); ``attention_mask`` covers the cache and the new
        tokens (B, past + L). Returns the final hidden states (B, L, hidden)."""
        vision = vision_expert_mask(token_type_ids)
        bias = attention_bias(attention_mask, inputs_embeds.shape[1])
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, vision, position_ids, bias, cache)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes=None,
        cache=None,
        use_cache: bool | None = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        """One prefill: input_ids (B, L) as ``CogVLMProcessor`` makes them (``IMAGE_TOKEN_INDEX`` where the
        image goes), images (N, 3, S, S). Returns the logits (B, L', vocab) over the spliced sequence
        (left-padded) and, with ``use_cache``, the cache. Continuing from a cache is ``generate``'s job."""
        del image_sizes
        unused.pop("host_input_ids", None)
        unused.pop("host_attention_mask", None)
        if unused:
            raise ValueError(f"unexpected arguments for CogVLMForCausalLM.forward: {sorted(unused)}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("CogVLMForCausalLM.forward runs a prefill on an empty cache; decode with generate()")
        spliced = self.splice(input_ids, attention_mask, images)
        if use_cache and cache is None:
            cache = DynamicCache()
        pruner = self.llm_pruner()
        if pruner is not None:
            # logits over the tokens left after the last drop (left-padded)
            hidden = pruned_prefill(self, spliced, pruner, cache if use_cache else None).hidden
        else:
            hidden = self.decode(spliced.inputs_embeds, spliced.attention_mask, spliced.token_type_ids,
                                 spliced.position_ids, cache if use_cache else None)
        return CausalLMOutputWithPast(logits=self.lm_head(hidden).float(), cache=cache if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes=None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        **unused,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with the KV cache -> (B, new) token ids (only the new tokens, padded
        with ``pad_token_id`` after a sample's eos). A new token is text: the language expert, the next
        position of its sample."""
        del image_sizes, use_cache
        unused.pop("host_input_ids", None)
        unused.pop("host_attention_mask", None)
        if unused:
            raise ValueError(f"unexpected arguments for CogVLMForCausalLM.generate: {sorted(unused)}")
        if num_beams != 1:
            raise ValueError(f"CogVLMForCausalLM.generate decodes greedily or by sampling: num_beams must be 1, got {num_beams}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        spliced = self.splice(input_ids, attention_mask, images)
        cache = DynamicCache()
        mask = spliced.attention_mask
        positions = spliced.position_ids[:, -1:]
        pruner = self.llm_pruner()
        prefix = None
        if pruner is not None:
            state = pruned_prefill(self, spliced, pruner, cache)
            hidden, prefix = state.hidden, state.prefix
        else:
            hidden = self.decode(spliced.inputs_embeds, mask, spliced.token_type_ids, spliced.position_ids, cache)
        bsz = hidden.shape[0]
        done = torch.zeros(bsz, dtype=torch.bool, device=hidden.device)
        out = []
        for step in range(max_new_tokens):
            logits = self.lm_head(hidden[:, -1]).float()
            token = self._next_token(logits, do_sample, temperature, top_p)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token)
            done = done | (token == eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            positions = positions + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            embeds = self.model.embed_tokens(token).unsqueeze(1)
            if prefix is not None:
                hidden = pruned_decode_step(self, prefix, embeds, mask, positions, cache)
            else:
                types = torch.full_like(positions, LANGUAGE_TOKEN_TYPE)
                hidden = self.decode(embeds, mask, types, positions, cache)
        return torch.stack(out, dim=1)

    @staticmethod
    def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float | None, top_p: float | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits / (temperature or 1.0)
        probs = logits.softmax(dim=-1)
        if top_p is not None and top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1).squeeze(-1)
