"""The encoder adapter for vLLM's own CLIP tower (``vllm.model_executor.models.clip.CLIPVisionModel``).

vLLM's CLIP has the Hugging Face module names (``vision_model.embeddings``, ``pre_layrnorm``,
``encoder.layers[i].layer_norm1`` / ``self_attn``) with two differences the methods must not see:

- the attention projects q, k and v with one fused ``qkv_proj`` (a ``QKVParallelLinear``, returning
  ``(output, bias)``), and a layer's ``forward`` takes only the hidden states;
- vLLM builds the tower only up to LLaVA's feature layer (``vision_feature_layer=-2``: 23 of 24 layers), so
  the layer count that LLaVA's ``select_layer`` refers to is the config's, not ``len(layers)``. With a
  compression method the plugin's model classes build it to the config's depth (``visionzip.vllm.llava.
  full_depth_tower``), so that a method scoring the last layer (PruMerge) finds it loaded.

``VllmCLIPEncoderAdapter`` hides both (its ``layers`` are views of vLLM's layers whose ``self_attn`` also has
the Hugging Face ``q_proj`` / ``k_proj`` / ``v_proj``, the thirds of ``qkv_proj``, and an ``out_proj`` returning
a tensor: enough for a method's own layer loop, ToMe's), so the methods' own code
(``settings.encode``) runs on vLLM's tower: the tower runs up to the scored layer with vLLM's attention, and
the scores come from that layer's q and k (``queries_keys``), never from an attention map of the tower.
``encode_on_tower`` / ``check_on_tower`` run a method's ``encode`` / ``check`` there for the plugin's model
classes. Pure torch: nothing here imports vLLM
except the tensor-parallel gather, which runs only where the tower's heads are split across ranks.

Qwen2.5-VL (``qwen_tower_pass``): vLLM's ``Qwen2_5_VisionTransformer`` runs all images of an encoder batch as
one window-ordered sequence into the 2 x 2 merger, as transformers' does; the last block's q and k (after
RoPE) are taken from the output of that block's rotary embedding (a forward hook: the tensors its attention
uses), and each image becomes the transformers path's merged-token view (``hf.qwen2_5_vl.Qwen2_5_VLUnits``,
here ``VllmQwen2_5_VLUnits``), which the methods' ``compress`` takes.
"""
from __future__ import annotations

import dataclasses

import torch

from ..encoders import CLIPEncoderAdapter, EncoderCapture
from ..hf.base import fixed_count
from ..hf.qwen2_5_vl import Qwen2_5_VLUnits
from ..methods import CompressedTokens, CompressionMethod


def _projections_full_width(attn, attn_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v (B, N, C), all heads side by side in head order, of vLLM's ``CLIPAttention`` ``attn``: the
    thirds of its fused ``qkv_proj`` (with their biases, unscaled: what Hugging Face's ``q_proj`` / ``k_proj`` /
    ``v_proj`` return)."""
    qkv, _ = attn.qkv_proj(attn_input)
    q, k, v = qkv.chunk(3, dim=-1)
    if getattr(attn, "tp_size", 1) > 1:
        # [VisionZip-LLaVA] under tensor parallelism each rank holds its heads' q, k and v; the methods see all
        # heads (scores and ToMe's metric average over them, and every rank must make the same choice), so
        # gather them (rank order = head order). Run on the CPU backend with 2 ranks:
        # scripts/check_vllm_tensor_parallel.py, docs/serving.md "Tensor parallelism".
        from vllm.distributed import tensor_model_parallel_all_gather

        q, k, v = (tensor_model_parallel_all_gather(part.contiguous(), dim=-1) for part in (q, k, v))
    return q, k, v


class _VllmAttentionView:
    """vLLM's ``CLIPAttention`` with the Hugging Face projections a method may call as plain linears (tensor
    in, tensor out): ``q_proj`` / ``k_proj`` / ``v_proj`` (all heads: PruMerge's full-width CLS attention,
    ToMe's own attention loop) and ``out_proj`` (all heads in); every other attribute is the module's own
    (``num_heads`` / ``head_dim`` are vLLM's totals over all ranks, the width the projections return).

    Under tensor parallelism every rank computes the attention of all heads (q, k, v gathered), so that a
    method's choices (ToMe's merges) are the same on every rank; ``out_proj`` then takes this rank's heads'
    slice back, the input vLLM's ``RowParallelLinear`` expects, and all-reduces as vLLM's own forward does."""

    # one fused qkv_proj serves the q_proj / k_proj / v_proj calls of one input: the last (attention, input,
    # q, k, v), shared by all views of a tower (bounded to one layer's projections)
    _last: list

    def __init__(self, attn: torch.nn.Module, last: list):
        self.attn = attn
        self._last = last

    def __getattr__(self, name: str):
        return getattr(self.attn, name)

    def _projections(self, attn_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._last and self._last[0] is self.attn and self._last[1] is attn_input:
            return self._last[2]
        qkv = _projections_full_width(self.attn, attn_input)
        self._last[:] = [self.attn, attn_input, qkv]
        return qkv

    def q_proj(self, attn_input: torch.Tensor) -> torch.Tensor:
        return self._projections(attn_input)[0]

    def k_proj(self, attn_input: torch.Tensor) -> torch.Tensor:
        return self._projections(attn_input)[1]

    def v_proj(self, attn_input: torch.Tensor) -> torch.Tensor:
        return self._projections(attn_input)[2]

    def out_proj(self, attn_output: torch.Tensor) -> torch.Tensor:
        """(B, N, C) attention output of all heads -> (B, N, C), through vLLM's ``out_proj`` (bias added)."""
        self._last.clear()  # the layer's attention is done: release its projections
        out_proj = self.attn.out_proj
        if getattr(self.attn, "tp_size", 1) > 1:
            # [VisionZip-LLaVA] RowParallelLinear takes this rank's heads (its input partition) and sums the
            # ranks' partial products
            width = out_proj.input_size_per_partition
            attn_output = attn_output[..., out_proj.tp_rank * width:(out_proj.tp_rank + 1) * width]
        out, _ = out_proj(attn_output.contiguous())
        return out


class _VllmLayerView:
    """One of vLLM's ``CLIPEncoderLayer``: called, hooked and read as the module itself (``layer_norm1``,
    ``layer_norm2``, and ``mlp``, whose vLLM forward returns a tensor, reduced over ranks), except
    ``self_attn`` (``_VllmAttentionView``)."""

    def __init__(self, layer: torch.nn.Module, last: list):
        self.layer = layer
        self.self_attn = _VllmAttentionView(layer.self_attn, last)

    def __getattr__(self, name: str):
        return getattr(self.layer, name)

    def __call__(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


class VllmCLIPEncoderAdapter(CLIPEncoderAdapter):
    """``VisionEncoderAdapter`` over vLLM's ``CLIPVisionModel`` (with or without its ``vision_model`` wrapper)."""

    family = "clip"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.core = getattr(model, "vision_model", model)
        last: list = []  # the projections cache the attention views share (_VllmAttentionView)
        self.layers = [_VllmLayerView(layer, last) for layer in self.core.encoder.layers]
        self.config = self.core.config  # vLLM's wrapper has no .config of its own

    @property
    def num_layers(self) -> int:
        # [VisionZip-LLaVA] vLLM truncates the tower after the feature layer; select_layer counts the full tower
        return int(self.config.num_hidden_layers)

    def layer_index(self, select_layer: int) -> int:
        index = super().layer_index(select_layer)
        if index >= len(self.layers):
            raise ValueError(
                f"select_layer={select_layer} is layer {index} of the tower, but vLLM built only its first "
                f"{len(self.layers)} layers (up to the model's vision_feature_layer); score a layer up to that one"
            )
        return index

    def run(
        self,
        pixel_values: torch.Tensor,
        select_layer: int = -2,
        capture_attn_input: bool = True,
        early_exit: bool = True,
    ) -> EncoderCapture:
        """``VisionEncoderAdapter.run`` for vLLM's layers (``layer(hidden)``). ``early_exit`` is always on:
        vLLM's tower has no complete-forward requirement (no ZeRO-3 hooks)."""
        self.check_pixels(pixel_values)
        index = self.layer_index(select_layer)
        hidden = self.embed(pixel_values.to(dtype=next(self.model.parameters()).dtype))
        for layer in self.layers[:index]:
            hidden = layer(hidden)
        attn_input = self.attention_input(index, hidden) if capture_attn_input else None
        hidden = self.layers[index](hidden)
        return EncoderCapture(hidden, attn_input, index)

    def queries_keys(
        self, layer_index: int, attn_input: torch.Tensor, query_rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """q (B, H, Nq, d), k (B, H, N, d) and the scale of layer ``layer_index``, from its fused ``qkv_proj``
        (the q and k thirds; k with its bias, before scaling, as ``VisionEncoderAdapter.queries_keys``)."""
        attn = self.layers[layer_index].self_attn.attn
        bsz, n, _ = attn_input.shape
        q, k, _ = _projections_full_width(attn, attn_input)
        heads, head_dim = attn.num_heads, attn.head_dim
        q = q.reshape(bsz, n, heads, head_dim).transpose(1, 2)
        if query_rows is not None:
            q = q[:, :, query_rows]
        k = k.reshape(bsz, n, heads, head_dim).transpose(1, 2)
        return q, k, float(attn.scale)


def _unsupported(settings: CompressionMethod, err: Exception) -> ValueError:
    return ValueError(
        f"visual_compression={settings.spec()!r}: {settings.name} does not run on vLLM's CLIP tower "
        f"({type(err).__name__}: {err}); the vLLM plugin serves methods that work through the encoder adapter "
        "(visionzip.vllm.encoders: vLLM's tower layers, scores from a layer's q and k)"
    )


def attach_compression(model, settings: CompressionMethod | None, vision_feature_layer) -> None:
    """Set on a vLLM LLaVA-family model (after its ``__init__``) what its image path needs: ``compression``,
    ``tower_adapter`` and, with a method, ``feature_layer`` and ``view_tokens`` (the kept tokens per view,
    the placeholders vLLM reserves); a method that cannot run on vLLM's tower is refused by name."""
    from ..hf.base import single_layer

    model.compression = settings
    model.tower_adapter = VllmCLIPEncoderAdapter(model.vision_tower)
    if settings is not None:
        model.feature_layer = single_layer(vision_feature_layer, type(model).__name__)
        check_on_tower(settings, model.tower_adapter, model.feature_layer)
        model.view_tokens = fixed_count(settings, model.tower_adapter.num_tokens)


def check_on_tower(settings: CompressionMethod, adapter: CLIPEncoderAdapter, feature_layer: int) -> None:
    """``settings.check`` on vLLM's tower, a method that cannot run there refused by name."""
    try:
        settings.check(adapter, feature_layer)
    except (AttributeError, TypeError, IndexError, NotImplementedError) as err:
        raise _unsupported(settings, err) from err


def encode_on_tower(settings: CompressionMethod, adapter: CLIPEncoderAdapter, pixel_values: torch.Tensor,
                    feature_layer: int, per_view: int) -> CompressedTokens:
    """``settings.encode`` (the method's own code) on vLLM's tower: pixel_values (V, 3, S, S) -> (V, T, C_vision)
    kept tokens, T = ``per_view``, the count vLLM reserved placeholders for."""
    try:
        compressed = settings.encode(adapter, pixel_values, feature_layer)
    except (AttributeError, TypeError, IndexError, NotImplementedError) as err:
        # a method that reaches into module internals vLLM's tower does not have; raised at startup by
        # process_weights_after_loading
        raise _unsupported(settings, err) from err
    if compressed.tokens.shape[1] != per_view:
        raise ValueError(
            f"visual_compression={settings.spec()!r} produced {compressed.tokens.shape[1]} tokens per view but vLLM "
            f"reserved {per_view} placeholders"
        )
    # [VisionZip-LLaVA] some methods return a strided view (pooling: a transposed pooled grid); vLLM's CPU
    # linear kernels (oneDNN, in its worker processes) require a unit stride on the last dimension
    return dataclasses.replace(compressed, tokens=compressed.tokens.contiguous())


# ----- Qwen2.5-VL: vLLM's Qwen2_5_VisionTransformer -------------------------------------------------------
class VllmQwen2_5_VisionTower:
    """What ``Qwen2_5_VLUnits`` reads of a Qwen2.5-VL tower (``blocks``, ``spatial_merge_size``, ``config``) for
    vLLM's ``Qwen2_5_VisionTransformer``, which keeps no config object: its blocks with the model's vision
    config. Without blocks (vLLM's processor, which holds no tower) it is the geometry a method's ``check``
    needs: the block count and the merge size."""

    def __init__(self, vision_config, blocks=None):
        self.config = vision_config
        self.spatial_merge_size = int(vision_config.spatial_merge_size)
        self.blocks = list(blocks) if blocks is not None else [None] * int(vision_config.depth)


class VllmQwen2_5_VLUnits(Qwen2_5_VLUnits):
    """``Qwen2_5_VLUnits`` (one image's merged tokens, scored with the last block's q and k) over vLLM's tower:
    its attention's softmax scale is ``head_dim ** -0.5`` (what it hands its ``MMEncoderAttention``)."""

    def attention_scale(self, layer_index: int) -> float:
        return float(self.layers[layer_index].attn.hidden_size_per_attention_head) ** -0.5


def qwen_units(vision_config, grid_thw, image: int = 0):
    """One image's merged-token view from its grid alone (geometry: the methods' ``check`` and counts)."""
    return VllmQwen2_5_VLUnits(VllmQwen2_5_VisionTower(vision_config), grid_thw, image)


def qwen_check_image(settings: CompressionMethod, vision_config, grid_thw, image: int = 0) -> int:
    """``settings.check`` on one image's merged tokens (a ValueError naming the image, its size and the
    spec); returns its placeholder count, the same as the transformers path's (``hf.qwen2_5_vl.check_images``)."""
    view = qwen_units(vision_config, grid_thw, image)
    try:
        settings.check(view, -1)
        return fixed_count(settings, view.num_tokens)
    except ValueError as err:
        raise ValueError(
            f"visual_compression={settings.spec()!r}: image {image} ({view.unit_rows} x {view.unit_cols} = "
            f"{view.num_tokens} merged tokens): {err}"
        ) from err


def _attended_bounds(visual, grid_thw: list[list[int]], full: bool) -> torch.Tensor:
    """The sequences the last block attends, in patches (window order), for the images of one pass: each frame
    of each image (full attention) or each window (``get_window_index_thw``). Computed from the grid, not
    taken from vLLM's attention metadata: some attention backends rescale those offsets."""
    bounds, offset = [0], 0
    for t, h, w in grid_thw:
        if full:
            bounds += [offset + h * w * (frame + 1) for frame in range(t)]
        else:
            _, window_bounds = visual.get_window_index_thw(t, h, w)
            bounds += (window_bounds.to(torch.long) + offset).tolist()
        offset += t * h * w
    return torch.tensor(sorted(set(bounds)))


def qwen_tower_pass(visual, vision_config, pixel_values: torch.Tensor, grid_thw: list[list[int]]) -> list:
    """vLLM's Qwen2.5-VL tower on the images of one encoder batch, with the last block's q and k (after RoPE)
    captured where that block computes them (a forward hook on its rotary embedding, whose output is the q and
    k its attention uses): one ``VllmQwen2_5_VLUnits`` per image, as ``hf.qwen2_5_vl.image_features`` builds
    them from transformers' tower."""
    metadata = visual.prepare_encoder_metadata(grid_thw)
    last = len(visual.blocks) - 1
    attn = visual.blocks[last].attn
    captured: dict = {}

    def grab(module, args, output):
        captured["qk"] = output  # (2 * batch, patches, heads, head_dim): q then k (batch = 1)

    handle = attn.apply_rotary_emb.register_forward_hook(grab)
    try:
        features = visual(pixel_values, grid_thw=grid_thw, encoder_metadata=metadata)
    finally:
        handle.remove()
    q, k = (part.transpose(0, 1) for part in captured["qk"])  # (heads, patches, head_dim), window order
    if getattr(attn, "tp_size", 1) > 1:
        # [VisionZip-LLaVA] under tensor parallelism each rank holds its heads; the scores average over all
        # heads, so gather them (rank order = head order). Not run on CPU here.
        from vllm.distributed import tensor_model_parallel_all_gather

        q = tensor_model_parallel_all_gather(q.contiguous(), dim=0)
        k = tensor_model_parallel_all_gather(k.contiguous(), dim=0)
    bounds = _attended_bounds(visual, grid_thw, last in visual.fullatt_block_indexes)
    tower = VllmQwen2_5_VisionTower(vision_config, visual.blocks)
    return VllmQwen2_5_VLUnits.from_pass(tower, grid_thw, features, q, k, bounds, metadata["window_index"])
