"""The multimodal part of LLaVA, independent of the language model: vision tower, projector, image
encoding (with optional VisionZip / VisPruner compression) and the splice of image features into the
text embeddings.

``LlavaMetaModel`` is mixed into the language model's base model (it owns ``vision_tower``,
``mm_projector`` and ``image_newline``); ``LlavaMetaForCausalLM`` into the causal-LM head class.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

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
from visionzip import CompressionConfig
from visionzip.pipeline import ViewTokens, layout_images, project

from .anyres import crop_grid
from .multimodal_encoder.builder import build_vision_tower
from .multimodal_projector.builder import build_vision_projector
from .splice import splice_image_features_on_device, spliced_length, spliced_sizes

logger = logging.getLogger(__name__)

MERGE_TYPES = ("flat", "spatial", "spatial_unpad")


# Stage 2 of the image pipeline: each view's tokens in the LLM's embedding space, (V, T, hidden), with the
# method's ``CompressedTokens`` of the same views (or None): ``visionzip.pipeline.ViewTokens``
ProjectedTokens = ViewTokens


@dataclass
class ImageFeatures:
    """Stage 3: what ``get_image_features`` returns. per_image: one (T_i, hidden) tensor per image, laid
    out as the LLM sees it; views: the projected tokens of every view (all images' views, in order)."""

    per_image: list[torch.Tensor]
    views: ProjectedTokens


@dataclass
class SplicedInputs:
    """The LLM's input after the splice. inputs_embeds (B, N, hidden); attention_mask (B, N) or None when
    nothing is padded and none was given; position_ids (B, N) or None likewise; labels (B, N) or None;
    visual_mask (B, N) bool, True where a visual token sits (in-LLM methods select among these)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None
    visual_mask: torch.Tensor


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
        """The compression this model applies, from ``config.visual_compression`` (absent: none), parsed
        once and cached until the config entry changes."""
        raw = getattr(self.config, "visual_compression", None)
        cached = self.__dict__.get("_visual_compression_cache")
        if cached is not None and cached[0] == raw:
            return cached[1]
        config = CompressionConfig.from_dict(raw)
        self.__dict__["_visual_compression_cache"] = (dict(raw) if isinstance(raw, dict) else raw, config)
        return config

    def set_visual_compression(self, config: CompressionConfig | dict | str | None):
        """Set the visual-token compression (what ``visionzip.apply_compression(model, SPEC)`` calls).

        ``config``: a ``CompressionConfig``, its dict, a spec string ("visionzip:64", "fastv:64", "none") or
        None (no compression). The budget is checked against the vision tower and the LLM (ValueError naming
        the value and the limit); the setting is stored in ``config.visual_compression`` and saved with the
        model.
        """
        if config is not None and not isinstance(config, (CompressionConfig, dict, str)):
            raise ValueError(f"expected a CompressionConfig, dict, spec string or None, got {type(config).__name__}")
        config = CompressionConfig.parse(config).validate()
        tower = self.get_vision_tower()
        if tower is None:
            raise ValueError("this model has no vision tower, so there are no visual tokens to compress")
        self.check_compression(config)
        self.config.visual_compression = config.to_dict()
        return self

    def check_compression(self, config: CompressionConfig) -> None:
        """Budget limits of ``config`` against this model's tower and LLM, before anything runs."""
        if not config.enabled:
            return
        if config.settings.stage == "llm":
            config.settings.check_llm(int(self.config.num_hidden_layers))
            tower = self.get_vision_tower()
            config.settings.check_view(tower.num_patches + int(tower.select_feature == "cls_patch"))
        else:
            self.get_vision_tower().check_compression(config)

    # ----- the image pipeline -------------------------------------------------------------------
    def get_image_features(self, pixel_values, image_sizes=None, project_views=None) -> ImageFeatures:
        """The one image pipeline: pixels -> the visual tokens each image contributes to the LLM.

        pixel_values: (B, 3, S, S) (one view per image) or, for anyres, a (B, 1 + crops, 3, S, S) tensor or a
        list of (1 + crops_i, 3, S, S) tensors (base image first, then the crops row by row).
        Stages, those of ``visionzip.pipeline`` on this model's tower, projector and crop grids: the tower
        (with any vision-side compression; ``VisionTower.encode``) -> encoder-space tokens per view; the
        projector -> ``ProjectedTokens``; the per-image layout (``layout_images``: flat, or the NeXT layout of
        ``anyres_layout`` on the grids of ``llava.model.anyres.crop_grid``) -> ``ImageFeatures.per_image``,
        one (T_i, hidden) tensor per image in the order given.
        ``project_views``: what runs stages 1-2 on the stacked views (default ``self.project_views``; the
        compiled path, ``llava.model.compiled``, passes its captured graph of them).
        """
        views, counts = _stack_views(pixel_values)
        projected = (project_views or self.project_views)(views)
        merge_type = getattr(self.config, "mm_patch_merge_type", "flat")
        if merge_type not in MERGE_TYPES:
            raise ValueError(f"unknown mm_patch_merge_type {merge_type!r}; use one of {MERGE_TYPES}")
        if counts is None:
            per_image = list(projected.tokens.unbind(0))
        elif merge_type == "flat":
            per_image = layout_images(projected, counts, "flat")
        else:
            newline = self.get_model().image_newline if "unpad" in merge_type else None
            layout = self.get_visual_compression().anyres_layout
            per_image = layout_images(projected, counts, layout, self._crop_grids(counts, image_sizes), newline)
        return ImageFeatures(per_image, projected)

    def project_views(self, views: torch.Tensor) -> ProjectedTokens:
        """Views (V, 3, S, S) -> the tower's (compressed) tokens of each view, projected into the LLM's
        embedding space: ``ProjectedTokens`` (V, T, hidden). The tower runs once for all views."""
        tokens, compressed = self.get_vision_tower().encode(views, self.get_visual_compression())
        return project(self.get_model().mm_projector, ViewTokens(tokens, compressed))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> projected visual tokens (B, T, hidden) (the original LLaVA's call)."""
        return self.project_views(images).tokens

    def _crop_grids(self, counts: list[int], image_sizes) -> list:
        """The crop grid (``visionzip.pipeline.CropGrid``) of each anyres image, None for one-view images."""
        if image_sizes is None:
            raise ValueError("anyres images with a spatial mm_patch_merge_type need image_sizes (width, height)")
        if len(image_sizes) != len(counts):
            raise ValueError(f"got {len(counts)} images but {len(image_sizes)} image_sizes")
        tower = self.get_vision_tower()
        aspect = getattr(self.config, "image_aspect_ratio", None)
        grids = []
        for count, size in zip(counts, image_sizes):
            if count == 1:
                grids.append(None)
                continue
            if aspect != "anyres":
                raise ValueError(f"{count} views per image need image_aspect_ratio 'anyres', not {aspect!r}")
            grid = crop_grid(size, getattr(self.config, "image_grid_pinpoints", None), tower.image_size,
                             tower.num_patches_per_side)
            if grid.crops != count - 1:
                raise ValueError(
                    f"image of size {tuple(size)} has a {grid.rows} x {grid.cols} crop grid but {count - 1} crops "
                    "were given"
                )
            grids.append(grid)
        return grids

    # ----- the multimodal splice ---------------------------------------------------------------
    def splice_multimodal(
        self, input_ids, images, image_sizes=None, attention_mask=None, position_ids=None, labels=None,
        padding_side: str | None = None, length: int | None = None, host_input_ids=None, host_attention_mask=None,
        project_views=None,
    ) -> SplicedInputs:
        """Encode ``images`` (``get_image_features``) and put each image's visual tokens in place of its
        ``IMAGE_TOKEN_INDEX`` in ``input_ids`` (``splice_image_features``; ``length`` and the host copies of
        the prompt are explained there; ``project_views``: see ``get_image_features``)."""
        features = self.get_image_features(images, image_sizes, project_views)
        return self.splice_image_features(
            input_ids, position_ids, attention_mask, labels, features.per_image, padding_side,
            length=length, host_input_ids=host_input_ids, host_attention_mask=host_attention_mask,
        )

    def splice_image_features(
        self, input_ids, position_ids, attention_mask, labels, image_features, padding_side: str | None = None,
        length: int | None = None, host_input_ids=None, host_attention_mask=None,
    ) -> SplicedInputs:
        """Replace each ``IMAGE_TOKEN_INDEX`` in ``input_ids`` by that image's visual tokens, given the
        images already encoded (``image_features``: one (T_i, hidden) tensor per image).

        Without ``labels`` (inference) this is the splice by index arithmetic on the device
        (``llava.model.splice``), which gives the same tensors as the reference
        (``splice_image_features_reference``) without walking the batch in Python. Its host
        synchronisations: none when the output width is known on the host, i.e. ``length`` is given (any
        width >= the longest spliced sample, e.g. a prefill bucket; extra width is padding) or the host
        (CPU) copies of the prompt are (``host_input_ids``, ``host_attention_mask``: the tokenizer's
        output before it was moved to the device); otherwise one read of three numbers (image tokens,
        longest and shortest sample). With ``length`` / host copies the attention mask and positions are
        always returned. With ``labels`` (training), or images that do not match the ``<image>`` tokens
        one to one (the training collator's dummy images, or an error), the reference runs.
        """
        if labels is not None:
            # [VisionZip-LLaVA] training keeps the reference: its dummy-image rule and count checks need the
            # per-sample placeholder counts on the host anyway, and a training step is not latency-bound
            return self.splice_image_features_reference(
                input_ids, position_ids, attention_mask, labels, image_features, padding_side
            )
        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        sizes = [feature.shape[0] for feature in image_features]
        if length is None and host_input_ids is not None:
            length = spliced_length(host_input_ids, host_attention_mask, sizes, max_length)
        returns_mask = length is not None or attention_mask is not None
        returns_positions = length is not None or position_ids is not None
        if length is None:
            lengths, image_tokens = spliced_sizes(input_ids, attention_mask, sizes)
            found, longest, shortest = torch.stack([image_tokens, lengths.max(), lengths.min()]).tolist()  # one read
            if found != len(image_features):
                return self.splice_image_features_reference(
                    input_ids, position_ids, attention_mask, labels, image_features, padding_side
                )
            if max_length is not None and longest > max_length:
                logger.warning(
                    "multimodal sequence of %d tokens cut to tokenizer_model_max_length=%d", longest, max_length
                )
                longest, shortest = min(longest, max_length), min(shortest, max_length)
            length = longest
            # as the reference: mask and positions only when given or when the batch is padded
            returns_mask = returns_mask or shortest != longest
            returns_positions = returns_positions or shortest != longest
        out = splice_image_features_on_device(
            input_ids, image_features, self.get_model().embed_tokens, attention_mask, None, side,
            length=length, max_length=max_length,
        )
        return SplicedInputs(
            out.inputs_embeds,
            out.attention_mask if returns_mask else None,
            out.position_ids if returns_positions else None,
            None,
            out.visual_mask,
        )

    def splice_image_features_reference(
        self, input_ids, position_ids, attention_mask, labels, image_features, padding_side: str | None = None
    ) -> SplicedInputs:
        """The splice as the original LLaVA computes it, per sample in Python (several host reads per
        sample on a GPU); what ``splice_image_features`` runs for training, and its test reference.

        Sequences are re-padded to the longest (on ``padding_side``, default
        ``config.tokenizer_padding_side``), labels ``IGNORE_INDEX`` over image tokens and padding, everything
        cut at ``tokenizer_model_max_length``. Images are consumed in order; a sample without ``<image>``
        either consumes none, or one dummy image (the original training collator's zero image) when there is
        one image per such sample.
        """
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

        new_embeds, new_labels, new_visual = [], [], []
        image_index = 0
        for ids, sample_labels, embeds, dummy in zip(ids_per_sample, labels_per_sample, text_embeds, dummies):
            positions = torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist()
            bounds = [-1] + positions + [ids.shape[0]]
            pieces, piece_labels, piece_visual = [], [], []
            text_start = 0
            for k in range(len(bounds) - 1):
                length = bounds[k + 1] - bounds[k] - 1
                pieces.append(embeds[text_start : text_start + length])
                piece_labels.append(sample_labels[bounds[k] + 1 : bounds[k + 1]])
                piece_visual.append(torch.zeros(length, dtype=torch.bool, device=labels.device))
                text_start += length
                if k < len(positions):
                    feature = image_features[image_index]
                    image_index += 1
                    pieces.append(feature.to(embeds.dtype))
                    piece_labels.append(torch.full((feature.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
                    piece_visual.append(torch.ones(feature.shape[0], dtype=torch.bool, device=labels.device))
            if dummy:
                # keeps the vision modules in the graph for text-only samples (DDP / ZeRO need every parameter)
                pieces.append(image_features[image_index][:0].to(embeds.dtype))
                image_index += 1
            new_embeds.append(torch.cat(pieces, dim=0))
            new_labels.append(torch.cat(piece_labels, dim=0))
            new_visual.append(torch.cat(piece_visual, dim=0))

        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if max_length is not None and any(e.shape[0] > max_length for e in new_embeds):
            longest = max(e.shape[0] for e in new_embeds)
            logger.warning(
                "multimodal sequence of %d tokens cut to tokenizer_model_max_length=%d", longest, max_length
            )
            new_embeds = [e[:max_length] for e in new_embeds]
            new_labels = [lab[:max_length] for lab in new_labels]
            new_visual = [v[:max_length] for v in new_visual]

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
        visual_out = torch.zeros(batch, longest, dtype=torch.bool, device=attention_mask.device)
        positions_out = torch.zeros(batch, longest, dtype=torch.long, device=attention_mask.device)
        for i, (embeds, sample_labels, visual, length) in enumerate(zip(new_embeds, new_labels, new_visual, lengths)):
            span = slice(longest - length, longest) if side == "left" else slice(0, length)
            embeds_out[i, span] = embeds
            labels_out[i, span] = sample_labels
            mask_out[i, span] = True
            visual_out[i, span] = visual
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
        return SplicedInputs(embeds_out, attention_mask, position_ids, labels, visual_out)

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


def _stack_views(pixel_values) -> tuple[torch.Tensor, list[int] | None]:
    """(B, 3, S, S) -> (views, None); (B, V, 3, S, S) or a list of (V_i, 3, S, S) / (3, S, S) tensors ->
    (all views stacked (sum V_i, 3, S, S), [V_i per image])."""
    if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
        return pixel_values, None
    if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim != 5:
        raise ValueError(
            f"pixel values must be (B, 3, S, S), (B, V, 3, S, S) or a list of (V, 3, S, S); got shape "
            f"{tuple(pixel_values.shape)}"
        )
    views = [image.unsqueeze(0) if image.ndim == 3 else image for image in pixel_values]
    return torch.cat(views, dim=0), [view.shape[0] for view in views]


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
