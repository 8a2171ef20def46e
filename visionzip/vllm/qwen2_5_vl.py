"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) served by vLLM with visual-token compression.

The compression is this project's transformers path (``visionzip.hf.qwen2_5_vl``): the method compresses each
image's **merged** tokens (after the 2 x 2 patch merger), scored with the last vision block's q and k, and
every kept token keeps its **original** M-RoPE (t, h, w) position; the text after an image keeps its original
position too (an image advances M-RoPE by max(h, w) / merge, its full grid, not by its kept count).

Subclasses of vLLM's own classes, no patching of vLLM:

- ``VisionZipQwen2_5_VLProcessingInfo`` / ``VisionZipQwen2_5_VLMultiModalProcessor``: the placeholder count
  vLLM writes for an image is the compressed count (the method's ``check`` and budget on the image's merged
  tokens: the same count as the transformers path's processor), so the scheduler, the KV cache and
  ``usage.prompt_tokens`` see the shorter sequence. A compressed model takes images only (videos are refused,
  see below).
- ``embed_multimodal``: vLLM's tower runs the images (``encoders.qwen_tower_pass``: the last block's q and k
  captured where that block computes them), the method's own ``compress`` keeps tokens per image
  (``hf.qwen2_5_vl.compress_units``, the code the transformers path runs), and each kept token carries four
  more channels: its (t, h, w) offset within the image's grid and the grid's width (``compute_mrope_for_media``,
  vLLM's own layout of those channels, as its video EVS appends them).
- Positions. vLLM computes a request's M-RoPE positions when the request is added, before any image is
  encoded (``get_mrope_input_positions``); here the text rows are final under the rule above and every row of
  an image holds the image's origin (the t position of all its tokens: images have one frame). The kept
  tokens' (h, w) are added once the image is encoded, by one of two routes:

  * ``embed_input_ids`` (where the model runner merges the step's image embeddings into the token embeddings)
    takes the channels off and hands them, with the image tokens' places in the step, to the ``forward`` that
    follows, which adds them to a copy of the step's positions. Both vLLM model runners call these two
    methods, with or without any setting: this is the route that runs on the CPU backend (tested).
  * ``recompute_mrope_positions``, vLLM's ``SupportsMultiModalPruning`` interface (which its video EVS uses):
    vLLM's runners call it after encoding only when ``video_pruning_rate > 0``; it takes the channels off
    and writes the rows into the request's stored positions (origin + offset: applying it twice changes
    nothing), and the first route then finds no channels. vLLM 0.32's CPU model runner never runs this
    interface (its ``load_model`` does not set the flag the GPU runner sets; vLLM's own Qwen2.5-VL with
    ``video_pruning_rate`` fails on the CPU backend on its first image), so this route is written for the GPU
    runners; here it is only called directly on the engine's model (tests/serving/test_qwen2_5_vl.py: the
    same positions as the first route and the transformers path, an image split across two chunks).

  Not served: videos (a compressed model takes images only: ``get_supported_mm_limits``) and pipeline
  parallelism (later stages do not see the embeddings; tensor parallelism is fine).

Refused when the engine starts, with a ValueError naming the spec: bad specs, methods acting inside the LLM
(stage ``llm``) or the tower (stage ``tower``: the tower runs all images as one window-ordered sequence),
methods whose count depends on the image, a budget beyond the largest image the processor makes, and methods
that cannot compress the merged-token view (``process_weights_after_loading`` compresses a blank image). A
request whose image is too small for the budget gets the method's own error (a 400 from the server).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from ..hf import qwen2_5_vl as hf_qwen
from ..hf.base import fixed_count, vision_settings
from ..methods import CompressionMethod
from .encoders import qwen_check_image, qwen_tower_pass
from .llava import compression_config

# the extra channels each compressed image embedding carries to embed_input_ids (or recompute_mrope_positions):
# (t, h, w) offset within the image's grid and the grid's width (vLLM's own layout, compute_mrope_for_media)
POSITION_CHANNELS = 4


def qwen_settings(hf_config) -> CompressionMethod | None:
    """The vision-side method ``hf_config.visual_compression`` names for Qwen2.5-VL (None: uncompressed); a
    ValueError naming the spec for a bad spec, an in-LLM or in-tower method, or an image-dependent count."""
    config = compression_config(hf_config)
    if not config.enabled:
        return None
    try:
        settings = vision_settings(config)
        hf_qwen.check(None, config)  # the transformers path's refusal of stage 'tower'
        fixed_count(settings, 1 << 20)
    except ValueError as err:
        raise ValueError(
            f"visual_compression={config.spec()!r}: {err}. The vLLM plugin compresses Qwen2.5-VL's merged tokens "
            "after the vision tower with a fixed budget per image; in-LLM methods (stage 'llm') are not served"
        ) from None
    return settings


class VisionZipQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def compression(self) -> CompressionMethod | None:
        return qwen_settings(self.get_hf_config())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        if self.compression() is None:
            return super().get_supported_mm_limits()
        # [VisionZip-LLaVA] images only: this class compresses images and sets their positions; a video's
        # placeholders and positions would follow vLLM's own rules, which it does not implement
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        settings = self.compression()
        if settings is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height,
                                                image_processor=image_processor, mm_kwargs=mm_kwargs)
        size, merged = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=1,
                                             image_processor=image_processor, mm_kwargs=mm_kwargs, modality="image")
        count = fixed_count(settings, merged)
        if count > merged:  # vLLM asks this for the largest image at startup (its memory profile)
            raise ValueError(
                f"visual_compression={settings.spec()!r} keeps {count} tokens per image, but a {image_width} x "
                f"{image_height} image is {size.width} x {size.height} pixels after the processor's resize, "
                f"{merged} merged tokens; give a budget up to {merged}"
            )
        return count


class VisionZipQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor with the compressed placeholder count per image."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = self.info.compression()
        if settings is None:
            return updates
        vision_config = self.info.get_hf_config().vision_config
        image_token = self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token]

        def image_replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return [image_token] * qwen_check_image(settings, vision_config, grid, item_idx)

        return [PromptReplacement(modality="image", target=[image_token], replacement=image_replacement)] + [
            update for update in updates if update.modality != "image"
        ]

    def apply(self, inputs, timing_ctx):
        settings = self.info.compression()
        if settings is not None:
            # before vLLM's processor: its multimodal cache records the images as sent to the engine as it
            # processes them, and a request refused after that leaves the engine without them (the next request
            # with the same image would fail with a cache miss instead of being answered)
            self._check_request(settings, inputs)
        return super().apply(inputs, timing_ctx)

    def _check_request(self, settings: CompressionMethod, inputs) -> None:
        """A ValueError for a request this model cannot serve: a prompt ending with an image placeholder, an
        image too small for the method (its size after the processor's resize, as ``_get_prompt_updates``)."""
        hf_config = self.info.get_hf_config()
        if inputs.prompt and inputs.prompt[-1] == hf_config.image_token_id:
            # recompute_mrope_positions (vLLM's pruning route) derives the decoding offset from the last prompt
            # position, which for a prompt ending inside an image would be its last kept token, not the
            # image's full extent
            raise ValueError(
                "a compressed Qwen2.5-VL prompt must not end with an image placeholder; close the image with "
                "<|vision_end|> (the chat template's placeholder <|vision_start|><|image_pad|><|vision_end|> does)"
            )
        images = inputs.mm_data_items.get("image")
        if images is None or not hasattr(images, "get_image_size"):
            return
        processor = self.info.get_image_processor(**inputs.hf_processor_mm_kwargs)
        patch = int(hf_config.vision_config.patch_size)
        for index in range(images.get_count()):
            size = images.get_image_size(index)
            resized, _ = self.info._get_vision_info(
                image_width=size.width, image_height=size.height, num_frames=1, image_processor=processor,
                mm_kwargs=inputs.hf_processor_mm_kwargs, modality="image",
            )
            qwen_check_image(settings, hf_config.vision_config, [1, resized.height // patch, resized.width // patch], index)


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen2_5_VLMultiModalProcessor,
    info=VisionZipQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VisionZipQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with each image's merged tokens compressed by a vision-side method, the kept tokens at
    their original M-RoPE positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        settings = qwen_settings(config)  # before any weight is allocated
        if settings is not None and vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                f"visual_compression={settings.spec()!r} on Qwen2.5-VL: pipeline_parallel_size="
                f"{vllm_config.parallel_config.pipeline_parallel_size} is not served: the kept tokens' positions are "
                "set on the first pipeline stage, where the images are embedded (use tensor parallelism)"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.compression = settings
        # the (h, w) offsets of this step's image tokens, from embed_input_ids to the forward that follows it
        self._image_offsets: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----- the images ------------------------------------------------------------------------------------
    def _compressed_images(self, image_input) -> tuple[torch.Tensor, ...]:
        """Per image (K_i, hidden + 4): the kept merged tokens in raster order, each with its (t, h, w) offset
        in the image's grid and the grid's width (the channels ``embed_input_ids`` / ``recompute_mrope_positions``
        read)."""
        if image_input["type"] != "pixel_values":
            raise ValueError(
                f"visual_compression={self.compression.spec()!r}: image embeddings given as input cannot be "
                "compressed (the method scores the tower's last block); send the images"
            )
        grids = [[int(v) for v in grid] for grid in image_input["image_grid_thw"].tolist()]
        vision_config = self.config.vision_config
        counts = [qwen_check_image(self.compression, vision_config, grid, i) for i, grid in enumerate(grids)]
        views = qwen_tower_pass(self.visual, vision_config, image_input["pixel_values"], grids)
        tokens, kept = hf_qwen.compress_units(self.compression, views)  # the transformers path's own code
        merge = self.visual.spatial_merge_size
        out = []
        for image, (features, keep, grid, count) in enumerate(zip(tokens, kept, grids, counts)):
            if features.shape[0] != count:
                raise ValueError(
                    f"visual_compression={self.compression.spec()!r} kept {features.shape[0]} tokens of image "
                    f"{image}, but vLLM reserved {count} placeholders"
                )
            offsets = compute_mrope_for_media(torch.tensor(grid), merge)[keep.cpu()]
            out.append(torch.cat([features, offsets.to(features)], dim=1))
        return tuple(out)

    def embed_multimodal(self, **kwargs: object):
        if self.compression is None:
            return super().embed_multimodal(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality != "image":  # the processor takes no video (get_supported_mm_limits)
                raise ValueError(f"visual_compression={self.compression.spec()!r}: a compressed Qwen2.5-VL takes "
                                 f"images only, got {modality}")
            embeddings += self._compressed_images(inputs)
        return embeddings

    def get_encoder_cudagraph_config(self):
        """vLLM's encoder CUDA-graph path (``compilation_config.cudagraph_mm_encoder``, GPU) runs the tower
        without ``embed_multimodal``, so it would skip the compression: off for every modality when compressed,
        as vLLM's Qwen2.5-VL turns it off for its own pruning."""
        config = super().get_encoder_cudagraph_config()
        return config if self.compression is None else dataclasses.replace(config, modalities=[])

    # ----- positions -------------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """vLLM's merge of the step's image embeddings into its token embeddings, after taking their position
        channels off: the channels (one row per image token of the step, in token order) go to the forward
        that follows, which writes the kept tokens' positions. Embeddings without the channels (vLLM's pruning
        path already took them off, ``recompute_mrope_positions``) pass unchanged."""
        self._image_offsets = None
        if self.compression is not None and multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            width = self.config.text_config.hidden_size
            if multimodal_embeddings[0].shape[-1] == width + POSITION_CHANNELS:
                offsets = torch.cat([embedding[:, width:width + 3] for embedding in multimodal_embeddings])
                rows = is_multimodal.nonzero()[:, 0]
                if rows.numel() != offsets.shape[0]:
                    raise ValueError(f"{offsets.shape[0]} image embeddings for {rows.numel()} image tokens in this step")
                self._image_offsets = (rows, offsets.round().long().T)
                multimodal_embeddings = [embedding[:, :width] for embedding in multimodal_embeddings]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """vLLM's forward, with the image tokens of this step at their original positions: their rows hold the
        image's origin (``get_mrope_input_positions``), plus each kept token's (t, h, w) offset."""
        return super().forward(input_ids, self.step_positions(positions), intermediate_tensors, inputs_embeds, **kwargs)

    def step_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The step's M-RoPE positions (3, T) with the offsets ``embed_input_ids`` took off the step's image
        embeddings added at their tokens' places (a copy: the model runner's buffer stays as it computed it);
        ``positions`` itself when the step had none."""
        if self._image_offsets is None:
            return positions
        rows, offsets = self._image_offsets
        self._image_offsets = None
        positions = positions.clone()
        rows = rows.to(positions.device)
        positions[:, rows] = positions[0, rows] + offsets.to(positions.device, positions.dtype)
        return positions

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """M-RoPE positions (3, N) at request time, before encoding: text rows final under this project's rule
        (an image advances the position by max(h, w) / merge, as in the uncompressed layout); every row of an
        image holds the image's origin, the t position of all its tokens, until each kept token's (h, w) offset is
        added once it is encoded (``forward``, or ``recompute_mrope_positions``). The same rule as
        ``hf.qwen2_5_vl.kept_positions``."""
        if self.compression is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        parts, current, start = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"a compressed Qwen2.5-VL takes images only, got {feature.modality}")
            offset, length = feature.mm_position.offset, feature.mm_position.length
            parts.append(np.broadcast_to(np.arange(current, current + offset - start), (3, offset - start)))
            current += offset - start
            parts.append(np.full((3, length), current))
            _, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
            current += max(h, w) // merge
            start = offset + length
        tail = len(input_tokens) - start
        parts.append(np.broadcast_to(np.arange(current, current + tail), (3, tail)))
        current += tail
        return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.int64)), current - len(input_tokens)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """``SupportsMultiModalPruning``: strip the position channels off the embeddings of this step's chunk and
        write their tokens' rows: the image's origin (their t row) + (0, h, w) offset. The chunk's embeddings
        are the image placeholders from ``num_computed_tokens`` on, in order (every placeholder of an image is
        one of its embeddings)."""
        if self.compression is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        positions = mrope_positions.clone()
        ids = torch.as_tensor(input_ids, device=positions.device)
        cleaned = [embedding[:, :-POSITION_CHANNELS] for embedding in multimodal_embeddings]
        if multimodal_embeddings:
            offsets = torch.cat([embedding[:, -POSITION_CHANNELS:-1] for embedding in multimodal_embeddings])
            offsets = offsets.to(positions.device).round().long().T  # (3, K)
            rows = (ids == self.config.image_token_id).nonzero()[:, 0]
            rows = rows[rows >= num_computed_tokens][: offsets.shape[1]]
            if rows.numel() != offsets.shape[1]:
                raise ValueError(
                    f"{offsets.shape[1]} image embeddings from prompt position {num_computed_tokens} on, but only "
                    f"{rows.numel()} image placeholders there"
                )
            positions[:, rows] = positions[0, rows] + offsets
        # the prompt ends with text (the processor refuses a trailing image): its last position + 1 continues
        return cleaned, positions, int(positions.max()) + 1 - ids.numel()

    # ----- startup ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook after the weights are loaded: compress a blank image (the smallest square
        the budget fits) once, so that a method that cannot compress the merged-token view is refused at
        startup, not on a request (the CPU backend under ``enforce_eager`` encodes no dummy image)."""
        if self.compression is None:
            return
        vision_config = self.config.vision_config
        merge, patch = int(vision_config.spatial_merge_size), int(vision_config.patch_size)
        budget = fixed_count(self.compression, 1 << 20)
        side = math.isqrt(max(budget, 1) - 1) + 1  # merged tokens per side
        try:
            qwen_check_image(self.compression, vision_config, [1, side * merge, side * merge])
        except ValueError:
            side = max(budget, side)  # e.g. pooling rows=1,cols=C: a side of C
        grid = [1, side * merge, side * merge]
        channels = int(vision_config.in_channels) * int(vision_config.temporal_patch_size) * patch * patch
        param = next(self.visual.parameters())
        pixels = torch.zeros(grid[1] * grid[2], channels, dtype=param.dtype, device=param.device)
        try:
            self._compressed_images({"type": "pixel_values", "pixel_values": pixels,
                                     "image_grid_thw": torch.tensor([grid])})
        except (AttributeError, TypeError, IndexError, NotImplementedError) as err:
            raise ValueError(
                f"visual_compression={self.compression.spec()!r}: {self.compression.name} does not run on the "
                f"merged-token view of vLLM's Qwen2.5-VL tower ({type(err).__name__}: {err}); the plugin serves "
                "encoder-output methods with a fixed budget"
            ) from err
