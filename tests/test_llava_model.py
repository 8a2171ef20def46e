"""LlavaLlamaForCausalLM behaviour beyond the fixture records: batches, padding, compression settings
(the one-liner, persistence, bad budgets), the NeXT layouts, labels and truncation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from visionzip import CompressionConfig

QUESTIONS = ["What is in the picture?", "Describe the colors you see, in detail, please.", "Why?"]


def make_images(seed: int = 7) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (336, 336), (300, 640)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


@pytest.fixture(scope="module")
def checkpoints(official_checkpoints):
    return official_checkpoints


@pytest.fixture(scope="module")
def models(checkpoints):
    return {
        version: load_pretrained_model(str(checkpoints / f"llava-{version}-tiny"), None, None, device="cpu")
        for version in ("v1.5", "v1.6")
    }


def padded_batch(ids_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, as a collator would hand them over."""
    longest = max(len(ids) for ids in ids_list)
    batch = torch.zeros(len(ids_list), longest, dtype=torch.long)
    mask = torch.zeros(len(ids_list), longest, dtype=torch.long)
    for i, ids in enumerate(ids_list):
        batch[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return batch, mask


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
@pytest.mark.parametrize("compression", [None, "visionzip:54,10"])
def test_batch_of_three_images_equals_three_single_calls(version, compression, models):
    tokenizer, model, processor, _ = models[version]
    model.set_visual_compression(compression)
    images = make_images()
    ids_list = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    try:
        with torch.no_grad():
            singles = [
                model(input_ids=ids[None], images=process_images([im], processor, model.config), image_sizes=[im.size]).logits[0]
                for ids, im in zip(ids_list, images)
            ]
            batch, mask = padded_batch(ids_list)
            pixels = process_images(images, processor, model.config)
            for side in ("right", "left"):
                model.config.tokenizer_padding_side = side
                out = model(input_ids=batch, attention_mask=mask, images=pixels, image_sizes=[im.size for im in images])
                longest = out.logits.shape[1]
                assert longest == max(s.shape[0] for s in singles)
                for i, single in enumerate(singles):
                    n = single.shape[0]
                    span = slice(0, n) if side == "right" else slice(longest - n, longest)
                    torch.testing.assert_close(out.logits[i, span], single, atol=1e-4, rtol=0)
    finally:
        model.config.tokenizer_padding_side = "right"
        model.set_visual_compression(None)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_batched_generate_equals_single_generate(version, models):
    tokenizer, model, processor, _ = models[version]
    images = make_images(seed=3)
    ids_list = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    model.set_visual_compression("vispruner:32")
    try:
        with torch.no_grad():
            singles = [
                model.generate(ids[None], images=process_images([im], processor, model.config),
                               image_sizes=[im.size], max_new_tokens=5)
                for ids, im in zip(ids_list, images)
            ]
            batch, mask = padded_batch(ids_list)
            together = model.generate(batch, attention_mask=mask, images=process_images(images, processor, model.config),
                                      image_sizes=[im.size for im in images], max_new_tokens=5, pad_token_id=0)
        assert [s[0].tolist() for s in singles] == together.tolist()
    finally:
        model.set_visual_compression(None)


def test_visual_token_counts_follow_the_compression(models):
    tokenizer, model, processor, _ = models["v1.5"]
    image = make_images()[0]
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    pixels = process_images([image], processor, model.config)
    text_tokens = ids.shape[1] - 1
    expected = {None: 576, "visionzip:54,10": 64, "visionzip:108,20": 128, "vispruner:32": 32, "vispruner:100,0.3": 100}
    try:
        for spec, visual in expected.items():
            model.set_visual_compression(spec)
            embeds = model.splice_multimodal(ids, pixels).inputs_embeds
            assert embeds.shape[1] == text_tokens + visual, spec
    finally:
        model.set_visual_compression(None)


def test_next_layouts_official_and_spatial(models):
    """Per-crop budgets on LLaVA-NeXT: the official layout has exactly (1 + crops) * (D + C) tokens; the
    spatial layout keeps unpad + image_newline, so it has the kept tokens inside the image plus one
    newline per grid row that still has tokens."""
    _, model, processor, _ = models["v1.6"]
    image = make_images()[2]  # 300 x 640: a 1 x 2 grid (crops stacked vertically), padded left and right
    pixels = process_images([image], processor, model.config)
    crops = pixels.shape[1]
    newline = model.get_model().image_newline
    try:
        model.set_visual_compression(CompressionConfig(method="visionzip", dominant=27, contextual=5))
        official = model.get_image_features(pixels, [image.size]).per_image[0]
        assert official.shape[0] == crops * 32
        assert not any(torch.equal(row, newline) for row in official)

        model.set_visual_compression(
            CompressionConfig(method="visionzip", dominant=27, contextual=5, anyres_layout="spatial")
        )
        projected = model.project_views(pixels[0])
        features, compressed = projected.tokens, projected.compressed
        spatial = model.get_image_features(pixels, [image.size]).per_image[0]
        is_newline = torch.tensor([torch.equal(row, newline) for row in spatial])
        grid = spatial[32:]
        # base view first, as in vanilla NeXT
        torch.testing.assert_close(spatial[:32], features[0])
        # every newline follows a grid token, the grid part ends with one, and CLS + contextual follow
        grid_newlines = is_newline[32:]
        tail = (crops - 1) * (1 + 5)
        assert bool(grid_newlines[-tail - 1]) and not grid_newlines[-tail:].any()
        kept_grid_tokens = int((~grid_newlines[:-tail]).sum())
        assert 0 < kept_grid_tokens <= (crops - 1) * 26
        assert grid.shape[0] == kept_grid_tokens + int(grid_newlines.sum()) + tail
        assert compressed.keep_indices.shape == (crops, 27)
    finally:
        model.set_visual_compression(None)


def test_one_liner_as_the_official_readme(models):
    _, model, _, _ = models["v1.5"]
    try:
        returned = visionzip.visionzip(model, dominant=54, contextual=10)
        assert returned is model
        assert model.get_visual_compression() == CompressionConfig(method="visionzip", dominant=54, contextual=10)
        assert model.config.visual_compression["dominant"] == 54
        visionzip.vispruner(model, tokens=64)
        assert model.get_visual_compression().method == "vispruner"
    finally:
        model.set_visual_compression(None)


@pytest.mark.parametrize(
    "apply, message",
    [
        (lambda m: visionzip.visionzip(m, dominant=570, contextual=10), "exceeds the 577 tokens"),
        (lambda m: visionzip.visionzip(m, dominant=0, contextual=10), "dominant must be >= 1"),
        (lambda m: visionzip.vispruner(m, tokens=600), "exceeds the 576 patch tokens"),
        (lambda m: m.set_visual_compression("visionzip:54,10,3"), "cannot parse"),
        (lambda m: m.set_visual_compression({"method": "zip"}), "unknown compression method"),
    ],
)
def test_bad_budgets_raise_value_errors(apply, message, models):
    _, model, _, _ = models["v1.5"]
    before = dict(model.config.visual_compression) if getattr(model.config, "visual_compression", None) else None
    with pytest.raises(ValueError, match=message):
        apply(model)
    after = getattr(model.config, "visual_compression", None)
    assert after == before


def test_save_reload_keeps_the_compression(models, tmp_path):
    tokenizer, model, processor, _ = models["v1.6"]
    config = CompressionConfig(method="visionzip", dominant=54, contextual=10, anyres_layout="spatial")
    image = make_images()[0]
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    pixels = process_images([image], processor, model.config)
    try:
        model.set_visual_compression(config)
        with torch.no_grad():
            before = model(input_ids=ids, images=pixels, image_sizes=[image.size]).logits
        model.save_pretrained(tmp_path / "saved")
        tokenizer.save_pretrained(tmp_path / "saved")
    finally:
        model.set_visual_compression(None)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["visual_compression"] == config.to_dict()
    _, reloaded, _, _ = load_pretrained_model(str(tmp_path / "saved"), None, None, device="cpu")
    assert reloaded.get_visual_compression() == config
    with torch.no_grad():
        after = reloaded(input_ids=ids, images=pixels, image_sizes=[image.size]).logits
    torch.testing.assert_close(after, before)
    # a load-time setting overrides the saved one
    _, overridden, _, _ = load_pretrained_model(
        str(tmp_path / "saved"), None, None, device="cpu", compression=CompressionConfig()
    )
    assert not overridden.get_visual_compression().enabled


def test_labels_mask_images_and_truncation(models):
    tokenizer, model, processor, _ = models["v1.5"]
    image = make_images()[1]
    ids = prompt_ids(tokenizer, QUESTIONS[0])
    labels = ids.clone()
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    pixels = process_images([image], processor, model.config)
    out = model(input_ids=ids[None], labels=labels[None], images=pixels)
    assert torch.isfinite(out.loss)
    new_labels = model.splice_multimodal(ids[None], pixels, labels=labels[None]).labels
    position = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    assert (new_labels[0, position : position + 576] == IGNORE_INDEX).all()
    assert new_labels[0, position + 576 :].tolist() == labels[position + 1 :].tolist()
    assert new_labels[0, :position].tolist() == labels[:position].tolist()
    original = model.config.tokenizer_model_max_length
    try:
        model.config.tokenizer_model_max_length = 300
        embeds = model.splice_multimodal(ids[None], pixels).inputs_embeds
        assert embeds.shape[1] == 300
    finally:
        model.config.tokenizer_model_max_length = original


def test_image_count_mismatch_is_a_value_error(models):
    tokenizer, model, processor, _ = models["v1.5"]
    images = make_images()[:2]
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    with pytest.raises(ValueError, match="1 <image> tokens .* but 2 images"):
        model(input_ids=ids, images=process_images(images, processor, model.config))


def test_text_only_sample_consumes_a_dummy_image(models):
    """The original training collator gives a text-only sample a zero image: it is not spliced in."""
    tokenizer, model, processor, _ = models["v1.5"]
    with_image = prompt_ids(tokenizer, QUESTIONS[0])
    text_only = tokenizer("USER: hello ASSISTANT:", return_tensors="pt").input_ids[0]
    batch, mask = padded_batch([with_image, text_only])
    pixels = process_images(make_images()[:1], processor, model.config)
    pixels = torch.cat([pixels, torch.zeros_like(pixels)])
    out_mask = model.splice_multimodal(batch, pixels, attention_mask=mask).attention_mask
    assert out_mask[0].sum() == len(with_image) - 1 + 576
    assert out_mask[1].sum() == len(text_only)


def test_fresh_next_model_initialises_image_newline(checkpoints):
    config = json.loads((checkpoints / "llava-v1.6-tiny" / "config.json").read_text())
    config["mm_vision_tower"] = str(checkpoints / "clip-vit-tiny-336")
    from llava.model import LlavaConfig

    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(LlavaConfig(**config))
    newline = model.get_model().image_newline
    assert torch.isfinite(newline).all()
    assert 0.3 * config["hidden_size"] ** -0.5 < newline.std() < 3 * config["hidden_size"] ** -0.5
