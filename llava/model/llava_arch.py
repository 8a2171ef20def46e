"""The multimodal part of LLaVA, independent of the language model: vision tower, projector, image
encoding (with optional VisionZip / VisPruner compression) and the splice of image features into the
text embeddings.

``LlavaMetaModel`` is mixed into the language model's base model (it owns ``vision_tower``,
``mm_projector`` and ``image_newline``); ``LlavaMetaForCausalLM`` into the causal-LM head class.
"""
from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava.mm_utils import get_anyres_image_grid_shape
from visionzip import CompressedTokens, CompressionConfig

from .anyres import compressed_spatial_layout, official_layout, spatial_features
from .multimodal_encoder.builder import build_vision_tower
from .multimodal_projector.builder import build_vision_projector

logger = logging.getLogger(__name__)

MERGE_TYPES = ("flat", "spatial", "spatial_unpad")


def newline_init_std(hidden_size: int) -> float:
    return float(hidden_size) ** -0.5


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.bin`` (torch) or ``.safetensors`` file, on CPU."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


class LlavaMetaModel:
    """Mixin for the base model: builds the vision modules that the config describes."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in getattr(config, "mm_patch_merge_type", ""):
                # [VisionZip-LLaVA] the original leaves image_newline as torch.empty (garbage in a freshly
                # built model); it is initialised here, and by _init_weights when a checkpoint lacks it.
                std = newline_init_std(config.hidden_size)
                self.image_newline = nn.Parameter(torch.randn(config.hidden_size) * std)

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        if isinstance(vision_tower, list):  # FSDP keeps the tower out of the wrapped modules
            vision_tower = vision_tower[0]
        return vision_tower

    def load_vision_tower(self, device_map=None):
        """Load the tower's weights from ``mm_vision_tower`` if they are not loaded yet, on the device and
        in the dtype of the token embeddings."""
        tower = self.get_vision_tower()
        if tower is None or tower.is_loaded:
            return tower
        tower.load_model(device_map=device_map)
        if not is_deepspeed_zero3_enabled():
            reference = self.embed_tokens.weight
            if reference.device.type != "meta":
                tower.to(device=reference.device, dtype=reference.dtype)
        tower.check_compression(CompressionConfig.from_dict(getattr(self.config, "visual_compression", None)))
        return tower

    def initialize_vision_modules(self, model_args, fsdp=None):
        """Add (or complete) the vision modules for training, from ``model_args`` (``vision_tower``,
        ``mm_vision_select_layer``, ``mm_vision_select_feature``, ``pretrain_mm_mlp_adapter``,
        ``mm_patch_merge_type``, ``mm_projector_type``), and record them in the config."""
        tower_name = model_args.vision_tower
        self.config.mm_vision_tower = tower_name
        if self.get_vision_tower() is None:
            vision_tower = build_vision_tower(model_args)
            self.vision_tower = [vision_tower] if fsdp else vision_tower
        else:
            vision_tower = self.get_vision_tower()
            vision_tower.load_model()

        merge_type = getattr(model_args, "mm_patch_merge_type", "flat")
        if merge_type not in MERGE_TYPES:
            raise ValueError(f"mm_patch_merge_type must be one of {MERGE_TYPES}, got {merge_type!r}")
        self.config.use_mm_proj = True
        self.config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear")
        self.config.mm_hidden_size = vision_tower.hidden_size
        self.config.mm_vision_select_layer = int(getattr(model_args, "mm_vision_select_layer", -2))
        self.config.mm_vision_select_feature = getattr(model_args, "mm_vision_select_feature", "patch")
        self.config.mm_patch_merge_type = merge_type

        if getattr(self, "mm_projector", None) is None:
            reference = self.embed_tokens.weight
            self.mm_projector = build_vision_projector(self.config).to(dtype=reference.dtype)
            if "unpad" in merge_type:
                std = newline_init_std(self.config.hidden_size)
                self.image_newline = nn.Parameter(torch.randn(self.config.hidden_size, dtype=reference.dtype) * std)
        else:
            self.mm_projector.requires_grad_(True)

        adapter_file = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if adapter_file:
            weights = load_weights_file(adapter_file)
            prefix = "mm_projector."
            projector = {k.split(prefix, 1)[1]: v for k, v in weights.items() if prefix in k}
            if not projector:
                raise ValueError(f"{adapter_file} holds no mm_projector weights (keys: {sorted(weights)[:5]}...)")
            self.mm_projector.load_state_dict(projector)
        vision_tower.check_compression(CompressionConfig.from_dict(getattr(self.config, "visual_compression", None)))


class LlavaMetaForCausalLM(ABC):
    """Mixin for the causal LM: image encoding, compression settings and the multimodal splice."""

    @abstractmethod
    def get_model(self):
        """The base model (a ``LlavaMetaModel``)."""

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    # ----- compression settings ----------------------------------------------------------------
    def get_visual_compression(self) -> CompressionConfig:
        """The compression this model applies, from ``config.visual_compression`` (absent: none)."""
        return CompressionConfig.from_dict(getattr(self.config, "visual_compression", None))

    def set_visual_compression(self, config: CompressionConfig | dict | str | None):
        """Set the visual-token compression (what ``visionzip.visionzip(model, ...)`` calls).

        ``config``: a ``CompressionConfig``, its dict, a spec string ("54,10", "vispruner:64", "none") or
        None (no compression). The budget is checked against the vision tower (ValueError naming the value
        and the limit); the setting is stored in ``config.visual_compression`` and saved with the model.
        """
        if config is None:
            config = CompressionConfig()
        elif isinstance(config, str):
            config = CompressionConfig.parse(config)
        elif isinstance(config, dict):
            config = CompressionConfig.from_dict(config)
        elif not isinstance(config, CompressionConfig):
            raise ValueError(f"expected a CompressionConfig, dict, spec string or None, got {type(config).__name__}")
        config.validate()
        tower = self.get_vision_tower()
        if tower is None:
            raise ValueError("this model has no vision tower, so there are no visual tokens to compress")
        tower.check_compression(config)
        self.config.visual_compression = config.to_dict()
        return self

    # ----- image encoding ----------------------------------------------------------------------
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, CompressedTokens | None]:
        """images (B, 3, S, S) -> (projected features (B, T, hidden), compressed or None).

        The tower runs once for the whole batch; with compression on (``config.visual_compression``), each
        image is compressed on its own and ``compressed`` carries the projected tokens and their positions.
        """
        tower = self.get_vision_tower()
        compression = self.get_visual_compression()
        tower.check_compression(compression)
        features, compressed = tower.encode(images, compression)
        projector = self.get_model().mm_projector
        weight = next(projector.parameters(), None)
        if weight is not None and weight.dtype.is_floating_point:
            features = features.to(weight.dtype)
        features = projector(features)
        if compressed is not None:
            compressed = dataclasses.replace(compressed, tokens=features)
        return features, compressed

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> projected visual tokens (B, T, hidden), compressed if configured."""
        return self.encode_image_tokens(images)[0]

    def image_features_per_image(self, images, image_sizes=None) -> list[torch.Tensor]:
        """Visual tokens of each image, (T_i, hidden) each, in the order the images are given.

        images: (B, 3, S, S) (one view per image) or, for anyres, a (B, 1 + crops, 3, S, S) tensor or a list
        of (1 + crops_i, 3, S, S) tensors (base image first, then the crops row by row).
        """
        if not (isinstance(images, list) or images.ndim == 5):
            return list(self.encode_images(images).unbind(0))
        views = [image.unsqueeze(0) if image.ndim == 3 else image for image in images]
        counts = [view.shape[0] for view in views]
        features, compressed = self.encode_image_tokens(torch.cat(views, dim=0))
        merge_type = getattr(self.config, "mm_patch_merge_type", "flat")
        if merge_type == "flat":
            return [f.flatten(0, 1) for f in features.split(counts, dim=0)]
        if not merge_type.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type {merge_type!r}; use one of {MERGE_TYPES}")
        if image_sizes is None:
            raise ValueError("anyres images with a spatial mm_patch_merge_type need image_sizes (width, height)")
        if len(image_sizes) != len(views):
            raise ValueError(f"got {len(views)} images but {len(image_sizes)} image_sizes")
        out = []
        start = 0
        for count, size in zip(counts, image_sizes):
            part = slice(start, start + count)
            start += count
            crops = None if compressed is None else _slice_compressed(compressed, part)
            out.append(self._spatial_image_features(features[part], crops, size, merge_type))
        return out

    def _spatial_image_features(
        self, features: torch.Tensor, compressed: CompressedTokens | None, image_size, merge_type: str
    ) -> torch.Tensor:
        """One anyres image: features (1 + K, T, hidden) of its base view and K crops -> (N, hidden)."""
        newline = self.get_model().image_newline if "unpad" in merge_type else None
        base = features[0]
        if features.shape[0] == 1:
            return base if newline is None else torch.cat([base, newline[None].to(base.dtype)], dim=0)
        if getattr(self.config, "image_aspect_ratio", None) != "anyres":
            raise ValueError(
                f"{features.shape[0]} views per image need image_aspect_ratio 'anyres', "
                f"not {getattr(self.config, 'image_aspect_ratio', None)!r}"
            )
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        grid_cols, grid_rows = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints, tower.image_size)
        if grid_rows * grid_cols != features.shape[0] - 1:
            raise ValueError(
                f"image of size {tuple(image_size)} has a {grid_rows} x {grid_cols} crop grid but "
                f"{features.shape[0] - 1} crops were given"
            )
        if compressed is None:
            if base.shape[0] != side * side:
                raise ValueError(
                    f"the spatial layout needs {side * side} patch tokens per view, got {base.shape[0]} "
                    "(mm_vision_select_feature must be 'patch')"
                )
            return torch.cat([base, spatial_features(features[1:], grid_rows, grid_cols, side, image_size, newline)])
        crops = _slice_compressed(compressed, slice(1, None))
        if self.get_visual_compression().anyres_layout == "official":
            grid = official_layout(crops, grid_rows, grid_cols, side)
        else:
            grid = compressed_spatial_layout(crops, grid_rows, grid_cols, side, image_size, newline)
        return torch.cat([base, grid], dim=0)

    # ----- the multimodal splice ---------------------------------------------------------------
    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        image_sizes=None,
        padding_side: str | None = None,
    ):
        """Replace each ``IMAGE_TOKEN_INDEX`` in ``input_ids`` by that image's visual tokens.

        Returns ``(None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)``: sequences
        re-padded to the longest (on ``padding_side``, default ``config.tokenizer_padding_side``), labels
        ``IGNORE_INDEX`` over image tokens and padding, everything cut at ``tokenizer_model_max_length``.
        Images are consumed in order; a sample without ``<image>`` either consumes none, or one dummy
        image (the original training collator's zero image) when there is one image per such sample.
        """
        vision_tower = self.get_vision_tower()
        if vision_tower is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        image_features = self.image_features_per_image(images, image_sizes)
        position_ids, attention_mask, inputs_embeds, labels = self.splice_image_features(
            input_ids, position_ids, attention_mask, labels, image_features, padding_side
        )
        return None, position_ids, attention_mask, past_key_values, inputs_embeds, labels

    def splice_image_features(
        self, input_ids, position_ids, attention_mask, labels, image_features, padding_side: str | None = None
    ):
        """The splice of ``prepare_inputs_labels_for_multimodal`` with the images already encoded
        (``image_features``: one (T_i, hidden) tensor per image, as ``image_features_per_image`` returns).
        Returns ``(position_ids, attention_mask, inputs_embeds, labels)``."""
        given_mask, given_positions, given_labels = attention_mask, position_ids, labels
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            attention_mask = attention_mask.bool()
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)

        ids_per_sample = [ids[mask] for ids, mask in zip(input_ids, attention_mask)]
        labels_per_sample = [lab[mask] for lab, mask in zip(labels, attention_mask)]
        placeholders = [int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in ids_per_sample]
        dummies = _dummy_images(placeholders, len(image_features))

        embed_tokens = self.get_model().embed_tokens
        text_ids = [ids[ids != IMAGE_TOKEN_INDEX] for ids in ids_per_sample]
        text_embeds = embed_tokens(torch.cat(text_ids)).split([len(t) for t in text_ids], dim=0)

        new_embeds, new_labels = [], []
        image_index = 0
        for ids, sample_labels, embeds, dummy in zip(ids_per_sample, labels_per_sample, text_embeds, dummies):
            positions = torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist()
            bounds = [-1] + positions + [ids.shape[0]]
            pieces, piece_labels = [], []
            text_start = 0
            for k in range(len(bounds) - 1):
                length = bounds[k + 1] - bounds[k] - 1
                pieces.append(embeds[text_start : text_start + length])
                piece_labels.append(sample_labels[bounds[k] + 1 : bounds[k + 1]])
                text_start += length
                if k < len(positions):
                    feature = image_features[image_index]
                    image_index += 1
                    pieces.append(feature.to(embeds.dtype))
                    piece_labels.append(torch.full((feature.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
            if dummy:
                # keeps the vision modules in the graph for text-only samples (DDP / ZeRO need every parameter)
                pieces.append(image_features[image_index][:0].to(embeds.dtype))
                image_index += 1
            new_embeds.append(torch.cat(pieces, dim=0))
            new_labels.append(torch.cat(piece_labels, dim=0))

        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if max_length is not None and any(e.shape[0] > max_length for e in new_embeds):
            longest = max(e.shape[0] for e in new_embeds)
            logger.warning(
                "multimodal sequence of %d tokens cut to tokenizer_model_max_length=%d", longest, max_length
            )
            new_embeds = [e[:max_length] for e in new_embeds]
            new_labels = [lab[:max_length] for lab in new_labels]

        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        lengths = [e.shape[0] for e in new_embeds]
        longest = max(lengths)
        batch = len(new_embeds)
        hidden = new_embeds[0].shape[1]
        embeds_out = new_embeds[0].new_zeros(batch, longest, hidden)
        labels_out = torch.full((batch, longest), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        mask_out = torch.zeros(batch, longest, dtype=torch.bool, device=attention_mask.device)
        positions_out = torch.zeros(batch, longest, dtype=torch.long, device=attention_mask.device)
        for i, (embeds, sample_labels, length) in enumerate(zip(new_embeds, new_labels, lengths)):
            span = slice(longest - length, longest) if side == "left" else slice(0, length)
            embeds_out[i, span] = embeds
            labels_out[i, span] = sample_labels
            mask_out[i, span] = True
            positions_out[i, span] = torch.arange(length, device=positions_out.device)

        padded = any(length != longest for length in lengths)
        # [VisionZip-LLaVA] the original returns attention_mask / position_ids as None whenever the caller
        # passed none, even when splicing made the samples' lengths differ; padding then leaks into
        # attention and positions. We return them whenever the batch is padded.
        attention_mask = None if given_mask is None and not padded else mask_out.to(
            given_mask.dtype if given_mask is not None else torch.long
        )
        position_ids = None if given_positions is None and not padded else positions_out
        labels = None if given_labels is None else labels_out
        return position_ids, attention_mask, embeds_out, labels

    # ----- tokenizer for training --------------------------------------------------------------
    def initialize_vision_tokenizer(self, model_args, tokenizer) -> None:
        """Add the image patch / start / end tokens that ``model_args`` asks for and size the embeddings."""
        if getattr(model_args, "mm_use_im_patch_token", False):
            tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))

        tune_adapter = getattr(model_args, "tune_mm_mlp_adapter", False)
        if getattr(model_args, "mm_use_im_start_end", False):
            added = tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))
            input_embeddings = self.get_input_embeddings().weight.data
            output_embeddings = self.get_output_embeddings().weight.data
            if added > 0:
                # new rows start at the mean of the existing ones
                input_embeddings[-added:] = input_embeddings[:-added].mean(dim=0, keepdim=True)
                output_embeddings[-added:] = output_embeddings[:-added].mean(dim=0, keepdim=True)
            if tune_adapter:
                self.get_input_embeddings().requires_grad_(True)
                self.get_output_embeddings().requires_grad_(False)
            adapter_file = getattr(model_args, "pretrain_mm_mlp_adapter", None)
            if adapter_file:
                weights = load_weights_file(adapter_file)
                trained = weights.get("model.embed_tokens.weight")
                if trained is None:
                    raise ValueError(f"{adapter_file} has no model.embed_tokens.weight for the image start/end tokens")
                if trained.shape == input_embeddings.shape:
                    input_embeddings[-added:] = trained[-added:]
                elif trained.shape[0] == added:
                    input_embeddings[-added:] = trained
                else:
                    raise ValueError(
                        f"model.embed_tokens.weight in {adapter_file} has shape {tuple(trained.shape)}; expected "
                        f"{tuple(input_embeddings.shape)} or {added} rows (the new tokens)"
                    )
        elif getattr(model_args, "mm_use_im_patch_token", False) and tune_adapter:
            self.get_input_embeddings().requires_grad_(False)
            self.get_output_embeddings().requires_grad_(False)


def _slice_compressed(compressed: CompressedTokens, part: slice) -> CompressedTokens:
    return dataclasses.replace(compressed, tokens=compressed.tokens[part], keep_indices=compressed.keep_indices[part])


def _dummy_images(placeholders: list[int], num_images: int) -> list[bool]:
    """Which samples consume a dummy image: none if the images match the ``<image>`` tokens one to one,
    every sample without ``<image>`` if there is one extra image for each of them; else a ValueError."""
    needed = sum(placeholders)
    if num_images == needed:
        return [False] * len(placeholders)
    without = [count == 0 for count in placeholders]
    if num_images == needed + sum(without):
        return without
    raise ValueError(
        f"the batch has {needed} <image> tokens ({placeholders} per sample) but {num_images} images were given"
    )
