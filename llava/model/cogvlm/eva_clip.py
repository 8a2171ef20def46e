"""EVA2-CLIP-E as CogVLM runs it, and its GLU adapter, with the hub's parameter names (``model.vision.*``).

Structure and names as THUDM/cogvlm-chat-hf ``visual.py`` (``EVA2CLIPModel``: ``patch_embedding``
(``proj`` conv, ``cls_embedding``, ``position_embedding``), ``transformer.layers[i]`` (``attention``:
fused ``query_key_value`` with bias, ``dense``; ``mlp``: ``fc1`` / ``fc2``; ``input_layernorm`` /
``post_attention_layernorm``), ``linear_proj`` (the GLU adapter: ``linear_proj``, ``norm1``,
``gate_proj``, ``dense_h_to_4h``, ``dense_4h_to_h``), ``boi`` / ``eoi``). The remote code is not in a git
repository; the same modules and names are in the transformers port of it, huggingface/transformers at
92657d1814440a90e0414544e1587471e8df85c2, ``src/transformers/models/cogvlm/modeling_cogvlm.py``
(``CogVLMVisionModel``), whose conversion script (``convert_cogvlm_original_to_pytorch.py`` at
067ce322f9f0c0d4029dcfcc883ee5460192632a) loads the remote model's ``state_dict()`` into it unchanged.

Two facts of that code that differ from a CLIP tower:

- a layer is *post-norm on each branch*: ``x = x + input_layernorm(attention(x))``, then
  ``x = x + post_attention_layernorm(mlp(x))``. The attention's input is the layer's input itself (no
  norm in front of it), so the scoring attention is recomputed from the layer input;
- CogVLM takes the last layer's output, drops CLS (``x[:, 1:]``), maps every patch through the GLU and
  frames the sequence with the learned ``boi`` / ``eoi`` embeddings (1225 + 2 = 1227 tokens on 490 px).

[VisionZip-LLaVA] the remote code runs the tower's attention with xformers' ``memory_efficient_attention``
(no mask, scale head_dim ** -0.5); we run SDPA with the same scale. The reference re-enactment
(``llava.model.cogvlm.reference``) runs the plain softmax attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from visionzip.encoders import EncoderCapture, VisionEncoderAdapter


class PatchEmbedding(nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.proj = nn.Conv2d(vision.in_channels, vision.hidden_size, kernel_size=vision.patch_size, stride=vision.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, vision.hidden_size))
        self.position_embedding = nn.Embedding(vision.num_positions, vision.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + P, C): CLS first, learned absolute positions added."""
        x = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.num_heads = vision.num_heads
        self.head_dim = vision.hidden_size // vision.num_heads
        self.scale = self.head_dim**-0.5
        self.query_key_value = nn.Linear(vision.hidden_size, vision.hidden_size * 3)
        self.dense = nn.Linear(vision.hidden_size, vision.hidden_size)
        self.output_dropout = nn.Dropout(vision.dropout_prob)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v each (B, H, N, d), as the remote code's ``reshape(B, L, 3, H, -1)``."""
        bsz, n, _ = x.shape
        qkv = self.query_key_value(x).reshape(bsz, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.output_dropout(self.dense(out.transpose(1, 2).reshape(bsz, n, -1)))


class MLP(nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.activation_fn = ACT2FN[vision.hidden_act]
        self.fc1 = nn.Linear(vision.hidden_size, vision.intermediate_size)
        self.fc2 = nn.Linear(vision.intermediate_size, vision.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.attention = Attention(vision)
        self.mlp = MLP(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(vision) for _ in range(vision.num_hidden_layers)])


class GLU(nn.Module):
    """CogVLM's adapter from the tower's width to the LLM's: linear, LayerNorm + GELU, SwiGLU."""

    def __init__(self, config, in_features: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """``model.vision``: the tower, the GLU adapter and the boi / eoi embeddings."""

    def __init__(self, config):
        super().__init__()
        vision = config.vision_namespace()
        self.vision_config = vision
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = Transformer(vision)
        self.linear_proj = GLU(config, in_features=vision.hidden_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def frame(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) adapter output -> (B, T + 2, hidden) with boi first and eoi last."""
        bsz = tokens.shape[0]
        return torch.cat((self.boi.expand(bsz, -1, -1).to(tokens.dtype), tokens, self.eoi.expand(bsz, -1, -1).to(tokens.dtype)), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P + 2, hidden): the remote ``EVA2CLIPModel.forward`` (uncompressed)."""
        x = self.patch_embedding(images)
        for layer in self.transformer.layers:
            x = layer(x)
        return self.frame(self.linear_proj(x[:, 1:]))


class EVA2CLIPEncoderAdapter(VisionEncoderAdapter):
    """The compression methods' view of EVA2-CLIP-E (``visionzip.encoders``): a CLS token at position 0,
    ``transformer.layers``, the fused ``query_key_value`` projection, and no pre-attention norm (the
    attention input of a layer is its input). CogVLM reads the last layer (``select_layer=-1``)."""

    has_cls = True
    family = "eva2-clip"
    pre_norm = None
    attention_norm = ""
    attention_module = "attention"

    def __init__(self, model: EVA2CLIPModel):
        self.model = model
        self.core = model
        self.layers = model.transformer.layers
        self.config = model.vision_config

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embedding(pixel_values)

    def attention_input(self, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        # post-norm branches: the attention reads the layer's input as it is
        return hidden

    def run(self, pixel_values, select_layer: int = -1, capture_attn_input: bool = True, early_exit: bool = True):
        """The tower up to (and including) the selected layer (see ``VisionEncoderAdapter.run``); one
        explicit loop whatever ``early_exit`` says (no parameter-gathering hooks are involved here)."""
        self.check_pixels(pixel_values)
        index = self.layer_index(select_layer)
        hidden = self.embed(pixel_values.to(dtype=self.model.patch_embedding.proj.weight.dtype))
        for layer in self.layers[:index]:
            hidden = layer(hidden)
        attn_input = hidden if capture_attn_input else None
        hidden = self.layers[index](hidden)
        return EncoderCapture(hidden, attn_input, index)

    def queries_keys(self, layer_index: int, attn_input: torch.Tensor, query_rows: slice | None = None):
        """q (B, H, Nq, d) of ``query_rows``, k (B, H, N, d) (with the projection's bias) and the scale,
        from the fused ``query_key_value`` of layer ``layer_index``."""
        attn = self.layers[layer_index].attention
        q, k, _ = attn.split_heads(attn_input)
        if query_rows is not None:
            q = q[:, :, query_rows]
        return q, k, float(attn.scale)
