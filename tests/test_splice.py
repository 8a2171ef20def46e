"""The sync-free splice (llava.model.splice) equals the reference splice of LlavaMetaForCausalLM, and
makes no host synchronisation when the output width is given."""
from __future__ import annotations

import pytest
import torch

from llava.bench.runner import OpAudit
from llava.bench.syncs import HostSyncAudit, count_host_syncs
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
        out = model.splice_image_features_reference(ids, None, mask, labels, feats, side)
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
            model.splice_image_features_reference(ids, None, mask, None, feats, "left")
        assert len(reference_audit.host_syncs) >= len(ROWS)


def test_host_sync_audit_finds_what_a_gpu_would_wait_for():
    x = torch.arange(6.0)
    mask = x > 2
    assert count_host_syncs(lambda: (x[mask], int(x.max()), torch.where(mask), x.tolist())).summary() == {
        "boolean-mask indexing": 1, "read a value (item / int / bool)": 1,
        "nonzero (also torch.where(condition))": 1, "tolist": 1,
    }
    assert count_host_syncs(lambda: torch.repeat_interleave(x, mask.long())).count == 1
    lean = count_host_syncs(lambda: (x.masked_fill(mask, 0), x.gather(0, mask.long()), x.topk(2),
                                     torch.repeat_interleave(x, mask.long(), output_size=3)))
    assert lean.count == 0 and lean.host_copies == []
    assert count_host_syncs(lambda: torch.tensor([1, 2])).host_copies == ["tensor from host data"]


# ----- the model's inference splice (LlavaMetaForCausalLM.splice_image_features) on the tiny checkpoints ----
@pytest.fixture(scope="module")
def tiny(official_checkpoints):
    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    root = official_checkpoints
    generator = torch.Generator().manual_seed(4)
    out = {}
    for version in ("v1.5", "v1.6"):
        _, llava, processor, _ = load_pretrained_model(str(root / f"llava-{version}-tiny"), None, None, device="cpu")
        from PIL import Image

        images = [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
                  for w, h in [(500, 375), (336, 700)]]
        out[version] = (llava, process_images(images, processor, llava.config), [im.size for im in images])
    return out


def image_path_and_splice(llava, pixels, sizes, ids, mask, **kwargs):
    return llava.splice_multimodal(ids, pixels, sizes, mask, padding_side="left", **kwargs)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
@pytest.mark.parametrize("spec", ["none", "visionzip:54,10", "vispruner:32"])
def test_image_path_and_splice_make_no_host_sync_with_a_host_known_width(tiny, version, spec):
    llava, pixels, sizes = tiny[version]
    llava.set_visual_compression(None if spec == "none" else spec)
    # a left-padded batch of 2, one image each (the second row is the longer prompt)
    ids, mask = batch_from([[1, IMG, 5, 6], [1, 2, 3, IMG, 7, 8, 9]], "left")
    with torch.no_grad():
        features = llava.get_image_features(pixels, sizes).per_image
        reference_out = llava.splice_image_features_reference(ids, None, mask, None, features, "left")
    # the width the host computes from the prompts it tokenized (feature counts are shapes: no read)
    width = spliced_length(ids, mask, [f.shape[0] for f in features],
                           getattr(llava.config, "tokenizer_model_max_length", None))

    lean = HostSyncAudit()
    with torch.no_grad(), lean:
        out = image_path_and_splice(llava, pixels, sizes, ids, mask, length=width)
    assert lean.syncs == [], lean.summary()
    # bit-identical to the reference splice
    assert torch.equal(out.inputs_embeds, reference_out.inputs_embeds)
    assert torch.equal(out.attention_mask, reference_out.attention_mask)
    assert torch.equal(out.position_ids, reference_out.position_ids)
    assert torch.equal(out.visual_mask, reference_out.visual_mask)

    # without the width: one read of three numbers; the reference: 6 per sample (what the bench reported)
    once = count_host_syncs(lambda: image_path_and_splice(llava, pixels, sizes, ids, mask))
    assert once.syncs == ["tolist"]
    before = count_host_syncs(lambda: llava.splice_image_features_reference(ids, None, mask, None, features, "left"))
    assert before.count == 6 * ids.shape[0]
    # the host copies of the prompt give the same tensors (their reads happen on the host)
    with torch.no_grad():
        hosted = image_path_and_splice(llava, pixels, sizes, ids, mask, host_input_ids=ids, host_attention_mask=mask)
    assert torch.equal(hosted.inputs_embeds, reference_out.inputs_embeds)
    llava.set_visual_compression(None)


def test_inference_splice_keeps_the_reference_contract(tiny):
    llava, pixels, sizes = tiny["v1.5"]
    llava.set_visual_compression("visionzip:54,10")
    with torch.no_grad():
        features = llava.get_image_features(pixels, sizes).per_image
        # an unpadded batch without a mask: no mask and no positions, as the reference
        ids = torch.tensor([[1, IMG, 5], [1, 7, IMG]])
        ours = llava.splice_image_features(ids, None, None, None, features, "right")
        ref = llava.splice_image_features_reference(ids, None, None, None, features, "right")
        assert ours.attention_mask is None and ours.position_ids is None and ref.attention_mask is None
        assert torch.equal(ours.inputs_embeds, ref.inputs_embeds)
        # a padded one without a mask: both return them
        ids = torch.tensor([[1, IMG, 5, 6], [1, 7, IMG, IMG]])
        three = features + features[:1]
        ours = llava.splice_image_features(ids, None, None, None, three, "right")
        ref = llava.splice_image_features_reference(ids, None, None, None, three, "right")
        assert torch.equal(ours.attention_mask, ref.attention_mask) and torch.equal(ours.position_ids, ref.position_ids)
        # images that do not match the <image> tokens: the reference's error
        with pytest.raises(ValueError, match="2 <image> tokens"):
            llava.splice_image_features(torch.tensor([[1, IMG, 5], [1, 7, IMG]]), None, None, None, three, "right")
        with pytest.raises(ValueError, match="2 <image> tokens but 3 image features"):
            llava.splice_image_features(torch.tensor([[1, IMG, 5], [1, 7, IMG]]), None, None, None, three, "right",
                                        host_input_ids=torch.tensor([[1, IMG, 5], [1, 7, IMG]]))
    llava.set_visual_compression(None)


def test_bad_padding_side(model):
    with pytest.raises(ValueError, match="padding side must be 'left' or 'right', got 'up'"):
        splice_image_features_on_device(torch.tensor([[1, 2]]), [], model.get_model().embed_tokens, padding_side="up")


# ----- eager generate from the processor's inputs: the host copies of the prompt reach the splice ----
@pytest.fixture(scope="module")
def tiny_with_processor(official_checkpoints):
    from PIL import Image

    from llava.model.builder import load_pretrained_model
    from llava.processor import LlavaProcessor

    root = official_checkpoints
    generator = torch.Generator().manual_seed(5)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
              for w, h in [(500, 375), (336, 700)]]
    out = {}
    for version in ("v1.5", "v1.6"):
        tokenizer, llava, image_processor, _ = load_pretrained_model(str(root / f"llava-{version}-tiny"), None, None,
                                                                     device="cpu")
        processor = LlavaProcessor.from_model(llava, tokenizer, image_processor)
        out[version] = (llava, processor(["What is in the picture?", "Describe the colors in detail, please."],
                                         images))
    out["chat"] = (tokenizer, image_processor, images[0])  # the v1.6 checkpoint's
    return out


def generate_audited(llava, kwargs, pad_token_id):
    """``llava.generate(**kwargs)`` under a host-sync audit. Returns (new tokens, the syncs made before the
    splice returned outside ``spliced_length``, the syncs inside it with the tensors it was given, the
    keyword names every ``forward`` call received)."""
    import llava.model.llava_arch as arch

    audit = HostSyncAudit()
    seen = {"host_reads": [], "host_args": [], "forward_keys": []}
    splice, width, forward = llava.splice_multimodal, arch.spliced_length, llava.forward

    def spliced_length(*args, **kw):  # the width from the host copies: reads there are host work
        before = audit.count
        out = width(*args, **kw)
        seen["host_reads"] += audit.syncs[before:]
        del audit.syncs[before:]
        seen["host_args"].append(args[:2])
        return out

    def splice_multimodal(*args, **kw):
        out = splice(*args, **kw)
        seen["until_splice"] = list(audit.syncs)
        return out

    def spy_forward(*args, **kw):
        seen["forward_keys"].append(sorted(kw))
        return forward(*args, **kw)

    arch.spliced_length, llava.splice_multimodal, llava.forward = spliced_length, splice_multimodal, spy_forward
    try:
        with torch.no_grad(), audit:
            tokens = llava.generate(**kwargs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                    pad_token_id=pad_token_id)
    finally:
        arch.spliced_length = width
        del llava.splice_multimodal, llava.forward
    return tokens, seen


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
@pytest.mark.parametrize("spec", ["visionzip:54,10", "vispruner:32"])
def test_generate_from_the_processor_makes_no_host_sync_up_to_the_splice(tiny_with_processor, version, spec):
    import warnings

    llava, inputs = tiny_with_processor[version]
    llava.set_visual_compression(spec)
    kwargs = inputs.generate_kwargs()
    # the processor hands the prompt's CPU copies along (same values as what goes to the device)
    assert kwargs["host_input_ids"].device.type == "cpu" and torch.equal(kwargs["host_input_ids"], inputs.input_ids)
    assert torch.equal(kwargs["host_attention_mask"], inputs.attention_mask)
    assert bool((inputs.attention_mask == 0).any())  # a padded batch
    pad = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, seen = generate_audited(llava, kwargs, pad)
    assert seen["until_splice"] == [], seen["until_splice"]
    # the only reads are the width's, on the processor's CPU tensors themselves
    assert len(seen["host_args"]) == 1 and seen["host_args"][0][0] is inputs.host_input_ids
    assert seen["host_reads"]
    # the host copies stay ours: transformers' generate and forward never see them, nor warn about them
    assert all(not any(key.startswith("host_") for key in keys) for keys in seen["forward_keys"])
    assert len(seen["forward_keys"]) == 3  # prefill + 2 decode steps
    assert not [str(w.message) for w in caught if "host_" in str(w.message)]
    assert not hasattr(llava.generation_config, "host_input_ids")

    # without them: one read of the width on the device, and the same tokens
    plain = {k: v for k, v in kwargs.items() if not k.startswith("host_")}
    plain_tokens, plain_seen = generate_audited(llava, plain, pad)
    assert plain_seen["until_splice"] == ["tolist"] and plain_seen["host_args"] == []
    assert torch.equal(tokens, plain_tokens)
    llava.set_visual_compression(None)


def test_chat_splice_makes_no_host_sync(tiny_with_processor):
    # serve.chat splices the encoded image into each turn that reads it, with the prompt's host copy
    import llava.model.llava_arch as arch
    from llava.serve.chat import ChatSession

    llava, _ = tiny_with_processor["v1.6"]
    tokenizer, image_processor, image = tiny_with_processor["chat"]
    llava.set_visual_compression("visionzip:54,10")
    chat = ChatSession(llava, tokenizer, image_processor)
    chat.set_image(image)
    audit, seen = HostSyncAudit(), {"host_reads": [], "splices": []}
    splice, width = llava.splice_image_features, arch.spliced_length

    def spliced_length(*args, **kw):  # reads of the host copy are host work
        before = audit.count
        out = width(*args, **kw)
        seen["host_reads"] += audit.syncs[before:]
        del audit.syncs[before:]
        return out

    def splice_image_features(*args, **kw):
        start = audit.count
        out = splice(*args, **kw)
        seen["splices"].append(audit.syncs[start:])
        return out

    arch.spliced_length, llava.splice_image_features = spliced_length, splice_image_features
    try:
        with torch.no_grad(), audit:
            reply = chat.ask("What is it?", max_new_tokens=2)
    finally:
        arch.spliced_length = width
        del llava.splice_image_features
        llava.set_visual_compression(None)
    assert isinstance(reply, str)
    assert seen["splices"] == [[]] and seen["host_reads"]  # one splice (the first turn), no device read in it
