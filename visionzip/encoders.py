"""Thin adapters over Hugging Face vision encoders (CLIP, SigLIP).

An adapter knows three things about an encoder: where its transformer layers are, whether its sequence
starts with a CLS token, and how the attention of one layer projects queries and keys. With that, the
scoring layer's attention is recomputed from its q and k for the rows that are needed, while the tower
itself keeps running with its fast attention (SDPA / FlashAttention). We never ask the tower for
``output_attentions`` (that forces eager attention in all layers and keeps every attention map).

``run`` is an explicit loop over the encoder's pieces (embeddings, the pre-layer norm where there is one,
the layers up to the scored one), so the whole pass (and the compression after it) is plain tensor code
that ``torch.compile(fullgraph=True)`` captures as one graph: no hooks, no exception to stop early. The
scored layer's attention input is that layer's own pre-attention norm applied to its input (the same module
on the same tensor as inside the layer: bit-identical). Only ``early_exit=False`` (DeepSpeed ZeRO-3, which
gathers parameters with hooks on a complete forward) runs the model's own forward, with capture hooks.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .copied import copied_from
from .scoring import received_attention

# normalised pixels ((x - mean) / std) stay within about 3 for CLIP and SigLIP; raw 0..255 values do not
MAX_NORMALISED_PIXEL = 10.0


@dataclass
class EncoderCapture:
    """What one encoder pass hands to the compression methods.

    hidden: (B, N, C) output of the selected layer (LLaVA's ``hidden_states[select_layer]``).
    attn_input: (B, N, C) the selected layer's attention input (after its pre-attention norm), or None.
    layer_index: 0-based index of the selected layer.
    """

    hidden: torch.Tensor
    attn_input: torch.Tensor | None
    layer_index: int


class VisionEncoderAdapter:
    """Structural view of an HF vision transformer: ``embeddings``, an optional pre-layer norm,
    ``encoder.layers[i]`` with its pre-attention norm and ``self_attn`` (``q_proj`` / ``k_proj`` /
    ``num_heads`` / ``head_dim`` / ``scale``)."""

    has_cls: bool = True
    family: str = "vit"
    # the norm applied to the embeddings before the first layer (CLIP's ``pre_layrnorm``), None: none
    pre_norm: str | None = None
    # the layer's norm in front of its self-attention: its output is the attention input
    attention_norm: str = "layer_norm1"
    # the layer's self-attention module (its input is the attention input ``_run_complete`` captures)
    attention_module: str = "self_attn"

    def __init__(self, model: nn.Module):
        self.model = model
        # transformers 4.x nests the transformer under `.vision_model`; 5.x puts it at the top.
        self.core = getattr(model, "vision_model", model)
        self.layers = self.core.encoder.layers
        self.config = model.config

    # ----- geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def num_tokens(self) -> int:
        """Tokens in the encoder sequence: patches, plus the CLS token where there is one."""
        return self.num_patches + int(self.has_cls)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def layer_index(self, select_layer: int) -> int:
        """Map LLaVA's ``select_layer`` (an index into ``hidden_states``, whose entry 0 is the
        embeddings) to the 0-based transformer layer whose output it is."""
        n = self.num_layers
        if isinstance(select_layer, bool) or not isinstance(select_layer, int):
            raise ValueError(f"select_layer must be an integer, got {select_layer!r}")
        if not (-n <= select_layer <= -1 or 1 <= select_layer <= n):
            raise ValueError(
                f"select_layer={select_layer} is out of range for an encoder with {n} layers: "
                f"use -{n}..-1 or 1..{n} (0 would be the embeddings, which have no attention to score)"
            )
        return select_layer + n if select_layer < 0 else select_layer - 1

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        channels = int(getattr(self.config, "num_channels", 3))
        expected = (channels, self.image_size, self.image_size)
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have rank 4 (B, {channels}, {self.image_size}, {self.image_size}); "
                f"got rank {pixel_values.dim()} with shape {tuple(pixel_values.shape)}"
            )
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but this encoder takes "
                f"(B, {channels}, {self.image_size}, {self.image_size})"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds an empty batch (B = 0)")

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Shape (``check_pixels``) and values: floating point, finite, normalised (|x| <= 10; a CLIP or
        SigLIP processor's output stays within about 3). For the one-shot public functions: the checks
        read the tensor on the host, which the model's own hot path (``run``) does not do."""
        self.check_pixels(pixel_values)
        if not pixel_values.dtype.is_floating_point:
            raise ValueError(
                f"pixel_values has dtype {pixel_values.dtype}: pass the image processor's normalised float "
                "pixels, not raw 0..255 values"
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values holds NaN or infinite values")
        peak = float(pixel_values.detach().abs().max())
        if peak > MAX_NORMALISED_PIXEL:
            raise ValueError(
                f"pixel_values reaches |{peak:g}|, beyond the {MAX_NORMALISED_PIXEL:g} of normalised pixels: pass "
                "the image processor's output (mean/std normalised), not raw 0..255 values"
            )

    # ----- running --------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, N, C) the first layer's input: the embeddings, then the pre-layer
        norm where the encoder has one (what the model's own forward computes before its layers)."""
        hidden = self.core.embeddings(pixel_values)
        if self.pre_norm is not None:
            hidden = getattr(self.core, self.pre_norm)(hidden)
        return hidden

    def attention_input(self, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, C) the input of layer ``layer_index`` -> its attention input (its pre-attention norm)."""
        return getattr(self.layers[layer_index], self.attention_norm)(hidden)

    # Copied from transformers v5.25.0, models/clip/modeling_clip.py, CLIPVisionModel.forward (embeddings,
    # pre-layer norm: ``embed``) and CLIPEncoder.forward (the layer loop), stopped after the selected layer
    @copied_from("transformers.models.clip.modeling_clip.CLIPVisionModel.forward", sha="ca1f51ee735860df", version="5.25.0")
    @copied_from("transformers.models.clip.modeling_clip.CLIPEncoder.forward", sha="72d9e376fa69940d", version="5.25.0")
    def run(
        self,
        pixel_values: torch.Tensor,
        select_layer: int = -2,
        capture_attn_input: bool = True,
        early_exit: bool = True,
    ) -> EncoderCapture:
        """Run the tower up to (and including) the selected layer and capture its output and,
        optionally, its attention input.

        ``early_exit`` skips the layers after the selected one (LLaVA never uses them): an explicit loop
        over the layers, traceable as one graph by ``torch.compile(fullgraph=True)``. Turn it off when
        something else must see a complete forward (e.g. DeepSpeed ZeRO-3 parameter hooks): the model's
        own forward then runs to the end, with hooks capturing the selected layer (same tensors).
        """
        self.check_pixels(pixel_values)
        index = self.layer_index(select_layer)
        pixel_values = pixel_values.to(dtype=next(self.model.parameters()).dtype)
        if not early_exit:
            return self._run_complete(pixel_values, index, capture_attn_input)
        hidden = self.embed(pixel_values)
        for layer in self.layers[:index]:
            hidden = layer(hidden, None)
        attn_input = self.attention_input(index, hidden) if capture_attn_input else None
        hidden = self.layers[index](hidden, None)
        return EncoderCapture(hidden, attn_input, index)

    def _run_complete(self, pixel_values: torch.Tensor, index: int, capture_attn_input: bool) -> EncoderCapture:
        """``run`` through the model's own complete forward, capturing layer ``index`` with hooks."""
        layer = self.layers[index]
        captured: dict[str, torch.Tensor] = {}

        def grab_attn_input(module, args, kwargs):
            captured["attn_input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def grab_output(module, args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output

        handles = [layer.register_forward_hook(grab_output)]
        if capture_attn_input:
            attention = getattr(layer, self.attention_module)
            handles.append(attention.register_forward_pre_hook(grab_attn_input, with_kwargs=True))
        try:
            self.model(pixel_values)
        finally:
            for handle in handles:
                handle.remove()
        return EncoderCapture(captured["hidden"], captured.get("attn_input"), index)

    def queries_keys(
        self, layer_index: int, attn_input: torch.Tensor, query_rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Recompute the selected layer's queries (only ``query_rows``) and keys.

        attn_input: (B, N, C). Returns q (B, H, Nq, d), k (B, H, N, d) and the softmax scale.
        Keys are the ``k_proj`` output with its bias, before any scaling (the VisionZip metric).
        """
        attn = self.layers[layer_index].self_attn
        bsz, n, _ = attn_input.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        # Project all rows, then slice: a one-row projection takes another BLAS kernel whose rounding
        # differs in the last bit, and VisPruner's chain of argsorts is sensitive to that. The full
        # projection costs ~0.3% of a ViT-L tower; the expensive part (the N x N map) is still avoided.
        q = attn.q_proj(attn_input).view(bsz, n, heads, head_dim).transpose(1, 2)
        if query_rows is not None:
            q = q[:, :, query_rows]
        k = attn.k_proj(attn_input).view(bsz, n, heads, head_dim).transpose(1, 2)
        return q, k, float(attn.scale)

    def received_attention(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, N) the attention each token of this adapter's sequence receives (VisionZip appendix A.2, for
        sequences without CLS), from q and k as ``queries_keys`` returns them: here the mean over heads and
        queries of the softmax over the N keys. An adapter whose tokens are groups of the tower's patches
        overrides it with its tower's own attention pattern (``visionzip.hf.qwen2_5_vl``: attention over the
        patches, averaged over each token's patches, as the official VisionZip Qwen2.5-VL port)."""
        return received_attention(q, k, scale)


class CLIPEncoderAdapter(VisionEncoderAdapter):
    has_cls = True
    family = "clip"
    pre_norm = "pre_layrnorm"


class SiglipEncoderAdapter(VisionEncoderAdapter):
    """SigLIP has no CLS token: every token is a patch (paper appendix A.2 scores by received attention)."""

    has_cls = False
    family = "siglip"


def current_attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation a HF model runs with ("sdpa", "eager", ...). The one place this codebase
    reads it: transformers 5 sets it with the public ``set_attn_implementation`` / ``attn_implementation=``
    but exposes it only on the config, as ``attn_implementation`` where the version has that property."""
    config = model.config
    if hasattr(type(config), "attn_implementation"):
        return config.attn_implementation
    return config.__dict__.get("_attn_implementation_internal")


@contextmanager
def attention_implementation(model: nn.Module, implementation: str | None):
    """Run ``model`` with another attention implementation ("eager", "sdpa", ...) for the duration of
    the block, then restore its own. ``None`` keeps the model's own."""
    current = current_attention_implementation(model)
    if implementation is None or implementation == current:
        yield model
        return
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(current)


def _encoder_classes():
    from transformers import (
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        SiglipVisionModel,
    )

    return [
        ((CLIPVisionModel, CLIPVisionModelWithProjection), CLIPEncoderAdapter),
        ((SiglipVisionModel,), SiglipEncoderAdapter),
    ]


def encoder_adapter(vision_model) -> VisionEncoderAdapter:
    """The adapter for a HF vision model (or an adapter, returned as is)."""
    if isinstance(vision_model, VisionEncoderAdapter):
        return vision_model
    for classes, adapter in _encoder_classes():
        if isinstance(vision_model, classes):
            return adapter(vision_model)
    supported = ", ".join(c.__name__ for classes, _ in _encoder_classes() for c in classes)
    raise ValueError(f"no VisionZip adapter for {type(vision_model).__name__}; supported encoders: {supported}")
