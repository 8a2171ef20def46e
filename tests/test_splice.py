"""The sync-free splice (llava.model.splice) equals the reference splice of LlavaMetaForCausalLM, and
makes no host synchronisation when the output width is given."""
from __future__ import annotations

import pytest
import torch

from llava.bench.runner import OpAudit
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.splice import splice_image_features_on_device, spliced_length

HIDDEN = 16
IMG = IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def model():
    config = LlavaConfig(vocab_size=50, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                         tokenizer_padding_side="right")
    torch.manual_seed(0)
    return LlavaLlamaForCausalLM(config).eval()


def batch_from(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids (pad id 0) and the mask of real tokens, padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids, mask


def features(sizes: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(t, HIDDEN, generator=generator) for t in sizes]


def reference(model, ids, mask, labels, feats, side, max_length=None):
    model.config.tokenizer_model_max_length = max_length
    with torch.no_grad():
        out = model.splice_image_features(ids, None, mask, labels, feats, side)
    return out.position_ids, out.attention_mask, out.inputs_embeds, out.labels, out.visual_mask


def assert_same(model, ids, mask, labels, feats, side, max_length=None):
    positions, attention, embeds, out_labels, visual = reference(model, ids, mask, labels, feats, side, max_length)
    with torch.no_grad():
        ours = splice_image_features_on_device(ids, feats, model.get_model().embed_tokens, mask, labels, side,
                                               max_length=max_length)
    torch.testing.assert_close(ours.inputs_embeds, embeds, rtol=0, atol=0)
    assert torch.equal(ours.visual_mask, visual)
    if attention is None:  # the reference leaves an unpadded, maskless batch without mask / positions
        assert bool(ours.attention_mask.bool().all())
        assert torch.equal(ours.position_ids, torch.arange(embeds.shape[1]).expand_as(ours.position_ids))
    else:
        assert torch.equal(ours.attention_mask, attention) and ours.attention_mask.dtype == attention.dtype
        assert torch.equal(ours.position_ids, positions)
    if labels is None:
        assert ours.labels is None
    else:
        assert torch.equal(ours.labels, out_labels)
    return ours


ROWS = [
    [1, 5, IMG, 7, 8],                   # one image in the middle
    [1, IMG, 9, IMG, 4, 4, 6, 2],        # two images
    [1, 3, 3],                           # no image
    [IMG, 11, 12, 13],                   # image first
]


@pytest.mark.parametrize("in_side", ["left", "right"])
@pytest.mark.parametrize("out_side", ["left", "right"])
@pytest.mark.parametrize("sizes", [[4, 4, 4, 4], [3, 6, 2, 5]], ids=["equal", "ragged"])
def test_equals_reference_padding_and_multiple_images(model, in_side, out_side, sizes):
    ids, mask = batch_from(ROWS, in_side)
    labels = torch.where(mask.bool(), ids.clamp(min=0) + 100, torch.full_like(ids, IGNORE_INDEX))
    feats = features(sizes)
    ours = assert_same(model, ids, mask, labels, feats, out_side)
    assert ours.inputs_embeds.shape[1] == 8 - 2 + sizes[1] + sizes[2]  # the two-image row is the longest
    assert_same(model, ids, mask, None, feats, out_side)


def test_equals_reference_without_mask_and_with_truncation(model):
    ids = torch.tensor([[1, IMG, 5, 6], [1, 2, IMG, 7]])
    feats = features([5, 5])
    assert_same(model, ids, None, None, feats, "left")
    labels = ids.clamp(min=0)
    ours = assert_same(model, ids, torch.ones_like(ids), labels, features([5, 2]), "right", max_length=6)
    assert ours.inputs_embeds.shape[1] == 6


def test_image_tensor_and_a_given_wider_length(model):
    ids, mask = batch_from([[1, IMG, 5], [1, 2, 3, IMG, 6, 7]], "left")
    stacked = torch.randn(2, 3, HIDDEN)
    _, attention, embeds, _, _ = reference(model, ids, mask, None, list(stacked.unbind(0)), "left")
    with torch.no_grad():
        wide = splice_image_features_on_device(ids, stacked, model.get_model().embed_tokens, mask, None, "left",
                                               length=embeds.shape[1] + 3)
    # extra left padding only: the real slots are the reference's, shifted right
    assert torch.equal(wide.inputs_embeds[:, 3:], embeds)
    assert not bool(wide.attention_mask[:, :3].any())
    assert torch.equal(wide.attention_mask[:, 3:].bool(), attention.bool())


def test_dummy_images_with_first_image(model):
    # the reference's training collator: the text-only middle sample consumes a (dropped) dummy image
    ids, mask = batch_from([[1, IMG, 5], [1, 2, 3], [1, 4, IMG]], "right")
    feats = features([3, 3, 3])
    positions, attention, embeds, _, _ = reference(model, ids, mask, None, feats, "right")
    with torch.no_grad():
        ours = splice_image_features_on_device(ids, feats, model.get_model().embed_tokens, mask, None, "right",
                                               first_image=torch.tensor([0, 1, 2]))
    assert torch.equal(ours.inputs_embeds, embeds)
    assert torch.equal(ours.position_ids, positions)


def test_spliced_length_on_host_and_count_check():
    ids, mask = batch_from(ROWS, "right")
    assert spliced_length(ids, mask, [4, 4, 4, 4]) == 8 - 2 + 8
    assert spliced_length(ids, mask, [4, 4, 4, 4], max_length=10) == 10
    with pytest.raises(ValueError, match="4 <image> tokens but 3 image features"):
        spliced_length(ids, mask, [4, 4, 4])


def test_no_host_sync_when_the_width_is_given(model):
    ids, mask = batch_from(ROWS, "left")
    feats = features([3, 6, 2, 5])
    length = spliced_length(ids, mask, [f.shape[0] for f in feats])
    embed = model.get_model().embed_tokens
    with torch.no_grad():
        lean = OpAudit(num_tokens=0, merge_shape=None)
        with lean:
            splice_image_features_on_device(ids, feats, embed, mask, None, "left", length=length)
        assert lean.host_syncs == []
        without_length = OpAudit(num_tokens=0, merge_shape=None)
        with without_length:
            splice_image_features_on_device(ids, feats, embed, mask, None, "left")
        assert without_length.host_syncs == ["torch.Tensor.__int__"]  # the one documented read
        # the reference splice, for contrast, syncs per sample
        reference_audit = OpAudit(num_tokens=0, merge_shape=None)
        with reference_audit:
            model.splice_image_features(ids, None, mask, None, feats, "left")
        assert len(reference_audit.host_syncs) >= len(ROWS)


def test_bad_padding_side(model):
    with pytest.raises(ValueError, match="padding side must be 'left' or 'right', got 'up'"):
        splice_image_features_on_device(torch.tensor([[1, 2]]), [], model.get_model().embed_tokens, padding_side="up")
