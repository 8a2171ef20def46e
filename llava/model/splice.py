"""The multimodal splice without host synchronisation: image features into the text embeddings.

``LlavaMetaForCausalLM.splice_image_features_reference`` (the original LLaVA's splice) walks the batch in
Python: per sample a boolean-mask gather, ``torch.where(...).tolist()`` for the image positions, and
per-piece slicing; on CUDA each of those waits for the device (6 host syncs per sample in the bench's
lean-path audit). This module computes the same result with index arithmetic on the device (the model's
inference splice, ``LlavaMetaForCausalLM.splice_image_features`` without labels, runs it):

- every input position gets a *span*: 1 for a real text token, T_j (that image's feature count) for the
  j-th ``IMAGE_TOKEN_INDEX``, 0 for padding; a cumulative sum of spans gives each position's place in
  its spliced sample, and the sample's length;
- each output slot finds its source position with ``torch.searchsorted`` over those cumulative ends,
  then reads either the text embedding of that position or row ``start_j + offset`` of the
  concatenated image features;
- padding (left or right) is an offset per sample; labels are ``IGNORE_INDEX`` over image tokens and
  padding; positions count 0.. within each sample.

The only value the host needs is the output width. Pass it as ``length`` (computed on the host from the
prompts, e.g. ``spliced_length`` over the CPU copies the tokenizer produced, or any larger width such
as a prefill bucket): then the splice makes no host synchronisation at all. Without it one read
(``lengths.max()``) gives the exact longest sample, as the reference pads to.

Contract differences from the reference (by design; a sync-free function cannot check data-dependent
facts): the number of images must match the ``<image>`` tokens (checked by ``spliced_length`` on the
host, not here); the reference's training-time "dummy image" for text-only samples is supported by
passing ``first_image`` (which image each sample starts at); the attention mask and positions are
always returned (the reference returns None for them when none was given and nothing was padded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class SplicedBatch:
    """inputs_embeds (B, W, hidden); attention_mask (B, W) (the given mask's dtype, else long);
    position_ids (B, W) long; labels (B, W) or None when none were given; visual_mask (B, W) bool, True
    where a visual token sits (the fields of ``llava_arch.SplicedInputs``)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    visual_mask: torch.Tensor


def _as_list(image_features) -> list[torch.Tensor]:
    if isinstance(image_features, torch.Tensor):
        if image_features.ndim != 3:
            raise ValueError(f"image_features as a tensor must be (N, T, hidden), got shape {tuple(image_features.shape)}")
        return list(image_features.unbind(0))
    return list(image_features)


def _sizes_on_device(sizes: list[int], device) -> torch.Tensor:
    """(N,) long tensor of ``sizes``, filled on the device: a tensor made from a host list would be a
    host-to-device copy (which CUDA's sync debug mode reports)."""
    return torch.cat([torch.full((1,), t, dtype=torch.long, device=device) for t in sizes])


def _spans(input_ids, attention_mask, feature_lengths: list[int], first_image):
    """Per-position spans (B, L), their cumulative ends (B, L), image-token flags and image indices."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_image = (input_ids == IMAGE_TOKEN_INDEX) & mask
    flags = is_image.long()
    before = flags.cumsum(dim=1) - flags  # images earlier in the same row
    if first_image is None:
        per_row = flags.sum(dim=1)
        first_image = per_row.cumsum(dim=0) - per_row
    image_index = (first_image.to(input_ids.device)[:, None] + before).clamp(0, max(len(feature_lengths) - 1, 0))
    if not feature_lengths:
        image_span = torch.zeros_like(flags)
    elif len(set(feature_lengths)) == 1:
        image_span = torch.full_like(flags, feature_lengths[0])
    else:
        image_span = _sizes_on_device(feature_lengths, input_ids.device)[image_index]
    span = torch.where(is_image, image_span, mask.long())
    return span, span.cumsum(dim=1), is_image, image_index


def spliced_sizes(input_ids, attention_mask, feature_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device, without reading anything: (each sample's spliced length (B,), the number of
    ``<image>`` tokens in the batch ()) when ``feature_lengths`` are the images' token counts in order.
    A caller that must read them reads both in one transfer."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    image_tokens = ((input_ids == IMAGE_TOKEN_INDEX) & mask).sum()
    _, ends, _, _ = _spans(input_ids, attention_mask, list(feature_lengths), None)
    return ends[:, -1], image_tokens


def spliced_length(input_ids, attention_mask, feature_lengths: list[int], max_length: int | None = None,
                   first_image=None) -> int:
    """The longest spliced sample, computed where the tensors live (give it the host copies of the
    prompts: then no device is involved). ValueError if the images do not match the ``<image>`` tokens."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    needed = int(((input_ids == IMAGE_TOKEN_INDEX) & mask).sum())
    if first_image is None and needed != len(feature_lengths):
        raise ValueError(
            f"the batch has {needed} <image> tokens but {len(feature_lengths)} image features were given"
        )
    _, ends, _, _ = _spans(input_ids, attention_mask, list(feature_lengths), first_image)
    longest = int(ends[:, -1].max())
    return min(longest, max_length) if max_length is not None else longest


def splice_image_features_on_device(
    input_ids: torch.Tensor,
    image_features,
    embed_tokens,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
    length: int | None = None,
    max_length: int | None = None,
    first_image: torch.Tensor | None = None,
) -> SplicedBatch:
    """Splice ``image_features`` into the embeddings of ``input_ids`` without host synchronisation.

    input_ids (B, L) with ``IMAGE_TOKEN_INDEX`` where images go; image_features: one (T_j, hidden)
    tensor per ``<image>`` token in batch order (row by row, left to right), or an (N, T, hidden) tensor;
    embed_tokens: the text embedding module; attention_mask (B, L) of real tokens (any padding side);
    labels (B, L) or None; padding_side of the output ("left" | "right"); length: the output width W
    (>= the longest spliced sample; None: the exact longest, at the cost of one host read);
    max_length: cut every sample to its first ``max_length`` positions (``tokenizer_model_max_length``);
    first_image (B,) long: index of each sample's first image (default: images in order, one per
    ``<image>``; pass it when samples consume extra dummy images).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {padding_side!r}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    features = _as_list(image_features)
    batch, width_in = input_ids.shape
    device = input_ids.device
    span, ends, is_image, image_index = _spans(input_ids, attention_mask, [f.shape[0] for f in features], first_image)
    starts_in_sample = ends - span
    totals = ends[:, -1]
    if max_length is not None:
        totals = totals.clamp(max=max_length)
    if length is None:
        length = int(totals.max())  # the one host read; pass `length` to avoid it
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")

    text = embed_tokens(input_ids.clamp(min=0))  # (B, L, hidden); placeholder and padding rows are unused
    hidden = text.shape[-1]
    offset = (length - totals) if padding_side == "left" else torch.zeros_like(totals)
    relative = torch.arange(length, device=device)[None, :] - offset[:, None]  # (B, W) place in the sample
    valid = (relative >= 0) & (relative < totals[:, None])
    relative = relative.clamp(min=0)
    source = torch.searchsorted(ends, relative, right=True).clamp(max=width_in - 1)  # (B, W)
    within = relative - starts_in_sample.gather(1, source)
    from_image = valid & is_image.gather(1, source)
    from_text = valid & ~from_image

    embeds = text.gather(1, source[..., None].expand(batch, length, hidden))
    if features:
        flat = torch.cat([f.to(text.dtype) for f in features], dim=0)  # (sum T_j, hidden)
        sizes = [f.shape[0] for f in features]
        if len(set(sizes)) == 1:
            image_start = image_index * sizes[0]
        else:
            sizes_on_device = _sizes_on_device(sizes, device)
            image_start = (sizes_on_device.cumsum(0) - sizes_on_device)[image_index]
        row = (image_start.gather(1, source) + within).clamp(0, max(flat.shape[0] - 1, 0))
        embeds = torch.where(from_image[..., None], flat[row], embeds)
    embeds = torch.where(valid[..., None], embeds, torch.zeros((), dtype=embeds.dtype, device=device))

    mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
    out_labels = None
    if labels is not None:
        out_labels = torch.where(from_text, labels.gather(1, source), torch.full_like(source, IGNORE_INDEX)).to(labels.dtype)
    return SplicedBatch(
        inputs_embeds=embeds,
        attention_mask=valid.to(mask_dtype),
        position_ids=torch.where(valid, relative, torch.zeros_like(relative)),
        labels=out_labels,
        visual_mask=from_image,
    )
