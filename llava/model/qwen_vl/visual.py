"""Qwen-VL's vision side: the OpenCLIP ViT-bigG and the ``attn_pool`` resampler, in the hub's parameter layout.

Facts from the hub's ``visual.py`` (Qwen/Qwen-VL-Chat; read in the vendored copy
wangjl1993/extract_human_attri@192fcbb ``Qwen-VL-Chat/visual.py``; docs/qwen_vl.md):

- ``conv1`` (patch embedding, no bias), then ``positional_embedding`` (256, width): a 16 x 16 grid whatever
  the image size, resized bicubically to the patch grid (``get_abs_pos``); ``ln_pre``; no CLS token;
- ``transformer.resblocks[i]``: pre-LayerNorm blocks (eps 1e-6) with ``attn.in_proj`` (width -> 3 width,
  laid out per head as [q_h, k_h, v_h]: the output is viewed (..., heads, 3 head_dim) and split), ``attn.out_proj``,
  ``mlp.c_fc`` -> exact GELU -> ``mlp.c_proj`` (``int(width * mlp_ratio)`` wide);
- ``attn_pool``, a ``Resampler``: ``n_queries`` learned ``query`` vectors (``ln_q``), one
  ``nn.MultiheadAttention`` (``output_dim // 128`` heads) over the patches (``kv_proj`` without bias when
  width != output_dim, then ``ln_kv``); the queries carry a fixed 2D sin-cos ``pos_embed`` of the query grid,
  the keys the same table resized bicubically to the patch grid, the values none;
- ``ln_post`` and ``proj`` (output_dim x output_dim, ``x @ proj``) on the resampler's output.

Ours runs the same modules batch-first with SDPA (the official is sequence-first and eager in the ViT; its
``nn.MultiheadAttention`` call also computes the head-averaged attention weights, ``need_weights`` defaulting to
True). ``resample(..., trace=True)`` returns those weights too: VisPruner traces each query's attention over
the patches through them (``llava.model.qwen_vl.compression``).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from visionzip.scoring import received_attention

from .config import DEFAULT_QUERIES

LAYER_NORM_EPS = 1e-6
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POSITIONAL_GRID = 256  # the ViT's positional_embedding rows: a 16 x 16 grid, hard-coded in the official code


def get_abs_pos(abs_pos: torch.Tensor, tgt_size: int) -> torch.Tensor:
    """(L, C) embeddings of a square grid -> (M, C) for a square grid of ``tgt_size`` = M cells: bicubic
    resize in float32, back to the table's dtype; the table itself when the sizes agree (official ``get_abs_pos``)."""
    src_side = int(math.sqrt(abs_pos.size(0)))
    tgt_side = int(math.sqrt(tgt_size))
    if src_side == tgt_side:
        return abs_pos
    grid = abs_pos.float().reshape(1, src_side, src_side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(tgt_side, tgt_side), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size^2, embed_dim) MAE 2D sin-cos table (the resampler's ``pos_embed`` at init; checkpoints hold it):
    first half the row coordinate, second half the column, each [sin | cos]."""
    if embed_dim % 4:
        raise ValueError(f"a 2D sin-cos table needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # numpy's meshgrid(w, h): w goes first

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0))
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    # official: emb_h from grid[0] (the w coordinates, meshgrid order), emb_w from grid[1]
    return torch.cat([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], dim=1)


class VisualAttention(nn.Module):
    """The ViT's self-attention: ``in_proj`` laid out per head ([q_h, k_h, v_h]), ``out_proj``; SDPA."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"width {embed_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v, each (B, H, N, d)."""
        bsz, n, _ = x.shape
        mixed = self.in_proj(x).view(bsz, n, self.num_heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        mlp_width = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList([VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])


class ResamplerAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight`` = [W_q; W_k; W_v], ``in_proj_bias``,
    ``out_proj``), computed batch-first with SDPA."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """(..., N, E) -> (..., H, N, d) through the ``which``-th of W_q, W_k, W_v."""
        embed = self.in_proj_weight.shape[1]
        rows = slice(which * embed, (which + 1) * embed)
        out = F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])
        return out.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, trace: bool = False):
        """query (Q, E) (shared by the batch), key / value (B, P, E) -> (B, Q, E), and with ``trace`` the
        attention weights averaged over heads (B, Q, P) (what ``nn.MultiheadAttention`` returns), else None."""
        q = self.project(query, 0)  # (H, Q, d)
        k, v = self.project(key, 1), self.project(value, 2)  # (B, H, P, d)
        q = q.unsqueeze(0).expand(k.shape[0], -1, -1, -1)
        weights = None
        if trace:
            probs = torch.softmax(torch.matmul(q * self.scale, k.transpose(-1, -2)), dim=-1)
            out = torch.matmul(probs, v)
            weights = probs.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2)), weights


class Resampler(nn.Module):
    """``attn_pool``: ``n_queries`` learned queries cross-attending to the patches (module docstring)."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        self.num_queries = grid_size**2
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, trace: bool = False):
        """x: (B, P, width) patches -> (B, Q, E) and, with ``trace``, the head-mean attention (B, Q, P)."""
        kv = self.ln_kv(self.kv_proj(x))
        table = self.pos_embed.to(kv.dtype)  # a fixed table: in the activations' dtype whatever it loaded in
        pos_embed = get_abs_pos(table, x.size(1))
        queries = self.ln_q(self.query) + table
        return self.attn(queries, kv + pos_embed, kv, trace=trace)


class QwenVisionTransformer(nn.Module):
    """``transformer.visual``: pixels (B, 3, S, S) -> (B, n_queries, output_dim) LLM embeddings."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 n_queries: int = DEFAULT_QUERIES, output_dim: int = 512, **kwargs):
        super().__init__()
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.grid_side = self.image_size // self.patch_size
        self.width = width
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(POSITIONAL_GRID, width))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio)
        self.attn_pool = Resampler(int(math.sqrt(n_queries)), output_dim, output_dim // 128, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(output_dim**-0.5 * torch.randn(output_dim, output_dim))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def num_queries(self) -> int:
        return self.attn_pool.num_queries

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P, width) the first block's input."""
        x = self.conv1(pixel_values.to(dtype=self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        return self.ln_pre(x)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Resampler outputs (B, T, E) (any subset or merge of the queries) -> LLM embeddings (B, T, E)."""
        return self.ln_post(tokens) @ self.proj

    def encode_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        queries, _ = self.attn_pool(self.encode_patches(pixel_values))
        return self.project(queries)

    def patch_attention(self, block_input: torch.Tensor) -> torch.Tensor:
        """(B, P) the attention each patch receives in the last block (mean over heads and over the P query
        rows), from that block's input: its q and k recomputed, the map accumulated in chunks."""
        attn = self.blocks[-1].attn
        q, k, _ = attn.qkv(self.blocks[-1].ln_1(block_input))
        return received_attention(q, k, attn.scale)
