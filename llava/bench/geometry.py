"""Named model geometries (real layer counts and widths, random weights) and the analytic cost model.

The FLOP count is the one the VisionZip paper uses for the LLM (after FastV): for ``n`` tokens, hidden
size ``d`` and FFN intermediate size ``m``, one transformer layer costs

    4 n d^2  (q, k, v, o projections)  +  2 n^2 d  (q k^T and attention x v)  +  2 n d m  (FFN)

and the prefill of ``L`` layers ``L`` times that. It is the paper's convention (multiply-accumulates of
the main matrix products, a two-matrix FFN), not an exact operation count of a SwiGLU Llama; ratios
between token budgets are what it is for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# LLaVA-NeXT's grid pinpoints (the released llava-v1.6 checkpoints).
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass(frozen=True)
class LlmGeometry:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: int | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class TowerGeometry:
    """A CLIP vision tower (``CLIPVisionConfig`` fields)."""

    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate: int = 4096
    image_size: int = 336
    patch_size: int = 14

    def clip_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, image_size=self.image_size, patch_size=self.patch_size,
            hidden_act="quick_gelu", projection_dim=768,
        )


@dataclass(frozen=True)
class Geometry:
    """A LLaVA model shape. ``anyres``: LLaVA-NeXT (base view + crops, ``spatial_unpad``); the benchmark
    feeds it an image of ``image_size`` (width, height), 672 x 672 = a 2 x 2 grid, i.e. 5 views."""

    name: str
    llm: LlmGeometry
    tower: TowerGeometry = field(default_factory=TowerGeometry)
    projector: str = "mlp2x_gelu"
    anyres: bool = False
    image_size: tuple[int, int] = (336, 336)
    description: str = ""


LLAMA_7B = LlmGeometry(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)
LLAMA_13B = LlmGeometry(hidden=5120, layers=40, heads=40, intermediate=13824, vocab=32000)
# the official fixtures' shape: the real ViT-L/14-336 token geometry (577 tokens, 24 layers), tiny widths
TINY_LLM = LlmGeometry(hidden=128, layers=2, heads=4, intermediate=256, vocab=400)
TINY_TOWER = TowerGeometry(hidden=64, layers=24, heads=4, intermediate=128)

GEOMETRIES: dict[str, Geometry] = {
    g.name: g
    for g in [
        Geometry("llava-1.5-7b", LLAMA_7B, description="Vicuna-7B + CLIP ViT-L/14-336, 576 visual tokens"),
        Geometry("llava-1.5-13b", LLAMA_13B, description="Vicuna-13B + CLIP ViT-L/14-336, 576 visual tokens"),
        Geometry(
            "llava-next-7b", LLAMA_7B, anyres=True, image_size=(672, 672),
            description="Vicuna-7B + CLIP ViT-L/14-336, anyres 672x672: base view + 2x2 crops",
        ),
        Geometry("tiny", TINY_LLM, TINY_TOWER, description="the fixtures' tiny shape (smoke tests)"),
        Geometry("tiny-next", TINY_LLM, TINY_TOWER, anyres=True, image_size=(672, 672),
                 description="the tiny shape, anyres 672x672 (smoke tests)"),
    ]
}


def get_geometry(name: str) -> Geometry:
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; choose one of {sorted(GEOMETRIES)}")
    return GEOMETRIES[name]


# ----- analytic costs ---------------------------------------------------------------------------
def llm_layer_flops(n: int, hidden: int, intermediate: int) -> int:
    """The paper's FLOPs of one LLM layer over ``n`` tokens: 4 n d^2 + 2 n^2 d + 2 n d m."""
    for name, value in (("n", n), ("hidden", hidden), ("intermediate", intermediate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * intermediate


def llm_prefill_flops(n: int, hidden: int, intermediate: int, layers: int) -> int:
    """The paper's LLM FLOPs for a prefill of ``n`` tokens (one sequence) through ``layers`` layers."""
    return layers * llm_layer_flops(n, hidden, intermediate)


def kv_cache_bytes(n: int, layers: int, kv_heads: int, head_dim: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Keys and values of ``n`` tokens in every layer: 2 * layers * batch * n * kv_heads * head_dim values."""
    return 2 * layers * batch * n * kv_heads * head_dim * bytes_per_value
