"""What the benchmark runs on: a LLaVA model (a checkpoint, or a named geometry with random weights),
synthetic inputs of a realistic length, and the compression methods to compare."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from visionzip import CompressionConfig

from .geometry import NEXT_GRID_PINPOINTS, Geometry

# Rows whose compression step is the method's official code path re-enacted (``settings.reference_tokens``):
# ``official:SPEC`` for any method spec; the older ``official-METHOD:ARGS`` is ``official:METHOD:ARGS``.
OFFICIAL_PREFIX = "official"


@dataclass(frozen=True)
class BenchMethod:
    """One row of the benchmark: ``compression`` is what the model applies; ``official`` rows run the
    official re-enactment for the compression step instead (same token count, so the LLM side is the
    same as the matching ``visionzip`` / ``vispruner`` row and is not measured again)."""

    spec: str
    compression: CompressionConfig
    official: bool = False

    @property
    def is_vanilla(self) -> bool:
        return not self.compression.enabled

    @property
    def label(self) -> str:
        label = self.compression.label()
        return f"official {label}" if self.official else label

    @property
    def ours_spec(self) -> str:
        """For an official row, the spec of our own implementation at the same settings."""
        return self.compression.spec()


def parse_method(spec: str) -> BenchMethod:
    """A ``--compression`` spec (``none``, ``METHOD:TOKENS``, ``METHOD:key=value,...``), or
    ``official:SPEC`` for the method's official code path re-enacted (``official-vispruner:64``
    is the legacy form)."""
    head, _, rest = spec.partition(":")
    if head == OFFICIAL_PREFIX or head.startswith(OFFICIAL_PREFIX + "-"):
        if not rest:
            raise ValueError(f"{spec!r}: give the settings, e.g. official:visionzip:64 or official:vispruner:64")
        inner = rest if head == OFFICIAL_PREFIX else f"{head[len(OFFICIAL_PREFIX) + 1:]}:{rest}"
        compression = CompressionConfig.parse(inner)
        if not compression.enabled:
            raise ValueError(f"{spec!r}: the official path needs a method")
        return BenchMethod(spec, compression, official=True)
    return BenchMethod(spec, CompressionConfig.parse(spec))


def default_methods(anyres: bool) -> list[str]:
    """The paper's budgets: per image for LLaVA-1.5 (64/128/192), per crop for LLaVA-NeXT (160/320/640
    over 5 views), VisPruner at 64, and the official path at the smallest budget."""
    if anyres:
        return ["none", "visionzip:32", "visionzip:64", "visionzip:128", "vispruner:32", "official:visionzip:32"]
    return ["none", "visionzip:64", "visionzip:128", "visionzip:192", "vispruner:64", "official:visionzip:64"]


# ----- models -----------------------------------------------------------------------------------
@contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in ``dtype`` (a 7B-shaped model would not fit in fp32 first on a GPU host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def geometry_config(geometry: Geometry, tower_dir: str, layers: int | None = None):
    from llava.model import LlavaConfig

    llm = geometry.llm
    extra = {}
    if geometry.anyres:
        extra = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                     image_grid_pinpoints=NEXT_GRID_PINPOINTS)
    return LlavaConfig(
        hidden_size=llm.hidden, intermediate_size=llm.intermediate, num_hidden_layers=layers or llm.layers,
        num_attention_heads=llm.heads, num_key_value_heads=llm.num_kv_heads, vocab_size=llm.vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        mm_vision_tower=tower_dir, mm_hidden_size=geometry.tower.hidden, mm_projector_type=geometry.projector,
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio=extra.pop("image_aspect_ratio", "pad"),
        mm_patch_merge_type=extra.pop("mm_patch_merge_type", "flat"), tokenizer_model_max_length=4096,
        tokenizer_padding_side="right",
        # the tower's structure is built with the model (random weights) instead of being loaded from
        # mm_vision_tower: the original's switch for a checkpoint whose tower was trained
        unfreeze_mm_vision_tower=True,
        **extra,
    )


def build_geometry_model(geometry: Geometry, layers: int | None = None, dtype=torch.float32, device="cpu"):
    """A ``LlavaLlamaForCausalLM`` of the geometry's shape with random weights (nothing is downloaded).
    ``layers`` caps the LLM's depth (the tower keeps its own)."""
    from transformers import CLIPImageProcessorPil

    from llava.model import LlavaLlamaForCausalLM

    side = geometry.tower.image_size
    with tempfile.TemporaryDirectory(prefix="llava-bench-tower-") as tower_dir:
        # the tower folder holds only configs: the structure is built from them, the weights are random
        geometry.tower.clip_config().save_pretrained(tower_dir)
        CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
            tower_dir
        )
        config = geometry_config(geometry, tower_dir, layers)
        torch.manual_seed(0)
        with torch.device(device), default_dtype(dtype):
            model = LlavaLlamaForCausalLM(config)
    return model.requires_grad_(False).eval()


def load_model(path: str, layers: int | None = None, dtype=torch.float32, device="cpu", model_base: str | None = None):
    """A checkpoint as ``llava.model.builder.load_pretrained_model`` reads it (full, LoRA or projector-only
    on ``model_base``). ``layers`` (full checkpoints only) builds the LLM with its first layers only, so
    that the others are never loaded (a 7B model would not fit in a small machine's memory in float32)."""
    if layers is None:
        from llava.model.builder import load_pretrained_model

        _, model, _, _ = load_pretrained_model(path, model_base, device=device, torch_dtype=dtype)
    else:
        from llava.model import LlavaLlamaForCausalLM
        from llava.model.builder import inspect_checkpoint

        kind = inspect_checkpoint(path).kind
        if kind != "llava" or model_base is not None:
            raise ValueError(f"--layers needs a full LLaVA checkpoint; {path!r} is a {kind!r} checkpoint")
        model = LlavaLlamaForCausalLM.from_pretrained(path, dtype=dtype, num_hidden_layers=layers)
        model.to(device=device, dtype=dtype)
    return model.requires_grad_(False).eval()


# ----- inputs -----------------------------------------------------------------------------------
@dataclass
class BenchInputs:
    """input_ids (B, text_tokens + 1) with one ``IMAGE_TOKEN_INDEX`` each; images (B, 3, S, S) or, for
    anyres, (B, 1 + crops, 3, S, S); image_sizes [(width, height)] * B or None."""

    input_ids: torch.Tensor
    images: torch.Tensor
    image_sizes: list[tuple[int, int]] | None
    text_tokens: int

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def views(self) -> torch.Tensor:
        """All views as one (B * V, 3, S, S) tensor: what the tower sees in one pass."""
        return self.images.flatten(0, 1) if self.images.ndim == 5 else self.images


def num_views(model, image_size: tuple[int, int]) -> int:
    """1 for LLaVA-1.5; 1 + rows * cols for an anyres model and an image of ``image_size``."""
    if getattr(model.config, "image_aspect_ratio", "pad") != "anyres":
        return 1
    from llava.mm_utils import get_anyres_image_grid_shape

    tower = model.get_vision_tower()
    cols, rows = get_anyres_image_grid_shape(image_size, model.config.image_grid_pinpoints, tower.image_size)
    return 1 + cols * rows


def make_inputs(model, batch: int, text_tokens: int = 64, image_size=(672, 672), seed: int = 0) -> BenchInputs:
    """Random token ids (BOS first, the image after a system-prompt-sized prefix, as in ``vicuna_v1``)
    and random normalised pixels, on the model's device and in the tower's dtype."""
    if text_tokens < 2:
        raise ValueError(f"text_tokens must be >= 2 (BOS and at least one more), got {text_tokens}")
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(3, vocab, (batch, text_tokens), generator=generator)
    ids[:, 0] = 1
    # vicuna_v1: ~40 tokens of system prompt and "USER:" before <image>, the question after it
    image_at = max(1, min(text_tokens - 1, (text_tokens * 5) // 8))
    input_ids = torch.cat([ids[:, :image_at], torch.full((batch, 1), IMAGE_TOKEN_INDEX), ids[:, image_at:]], dim=1)
    tower = model.get_vision_tower()
    side = tower.image_size
    views = num_views(model, tuple(image_size))
    shape = (batch, 3, side, side) if views == 1 and model.config.image_aspect_ratio != "anyres" else (
        batch, views, 3, side, side)
    images = torch.randn(shape, generator=generator)
    device = model.get_model().embed_tokens.weight.device
    image_sizes = [tuple(image_size)] * batch if len(shape) == 5 else None
    return BenchInputs(input_ids.to(device), images.to(device=device, dtype=tower.dtype), image_sizes, text_tokens)
