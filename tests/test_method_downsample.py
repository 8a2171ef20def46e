"""downsample (VTC-Bench's baseline): the fast path against its plain re-statement (the pixels resized, the
model's own forward with interpolated position embeddings) on a tiny random CLIP in the ViT-L/14-336
geometry and a SigLIP; the resize against PIL's BICUBIC (VTC-Bench's call); the tower really runs on the
small image; batch = one by one; budgets and bad settings; run_llava on the official tiny LLaVA-1.5 and
LLaVA-NeXT checkpoints and the Hugging Face LLaVA / LLaVA-NeXT classes at 64 (tiny: 16) tokens per view."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import visionzip
from visionzip import CompressionConfig
from visionzip.encoders import encoder_adapter
from visionzip.hf import compression_aware_processor
from visionzip.hf.tiny import tiny_llava, tiny_llava_next
from visionzip.methods.downsample import Downsample, downsample_pixels, reference_downsample

SPECS = ["downsample:64", "downsample:128", "downsample:192", "downsample:rows=8,cols=16"]


@pytest.fixture(scope="module")
def clip(official_dir):
    torch.manual_seed(1)
    return CLIPVisionModel(CLIPVisionConfig.from_pretrained(official_dir / "clip-vit-tiny-336")).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(101))


@torch.no_grad()
def test_fast_path_equals_the_plain_restatement_batched_and_one_by_one(clip, pixels):
    for spec in SPECS:
        settings = CompressionConfig.parse(spec).settings
        out = visionzip.compress(clip, pixels, CompressionConfig.parse(spec))
        expected = reference_downsample(clip, pixels, settings.rows, settings.cols)
        assert out.tokens.shape == (3, settings.tokens_per_view(), 64)
        assert out.num_kept == 0 and out.num_merged == settings.tokens_per_view() and not out.cls_kept
        # each token stands at the patch at the centre of its cell (CLS is position 0)
        centre = out.merged_indices[2, -1] - 1  # the last cell: bottom right
        assert divmod(int(centre), 24) == ((2 * settings.rows - 1) * 24 // (2 * settings.rows),
                                           (2 * settings.cols - 1) * 24 // (2 * settings.cols))
        assert out.merged_indices.shape == (3, settings.tokens_per_view()) and int(out.merged_indices.min()) >= 1
        torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=0)
        for view in range(3):
            alone = visionzip.compress(clip, pixels[view : view + 1], CompressionConfig.parse(spec))
            torch.testing.assert_close(alone.tokens, out.tokens[view : view + 1], atol=1e-5, rtol=0)
        # the ZeRO-3 path (the model's complete forward) gives the same tokens
        full = settings.encode(encoder_adapter(clip), pixels, -2, early_exit=False)
        torch.testing.assert_close(full.tokens, out.tokens, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_tower_runs_on_the_small_image_and_the_full_grid_is_vanilla(clip, pixels):
    lengths = []
    handle = encoder_adapter(clip).layers[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        visionzip.compress(clip, pixels[:1], CompressionConfig.parse("downsample:64"))
    finally:
        handle.remove()
    assert lengths == [65]  # 8 x 8 patches of a 112 px image + CLS, not 577
    # a grid of the tower's own size resizes nothing: the vanilla selected-layer patches
    whole = visionzip.compress(clip, pixels, CompressionConfig.parse("downsample:576"))
    vanilla = encoder_adapter(clip).run(pixels, -2, capture_attn_input=False).hidden[:, 1:]
    torch.testing.assert_close(whole.tokens, vanilla, atol=1e-5, rtol=0)
    # not the feature pooling baseline: the tower saw another image
    pooled = visionzip.compress(clip, pixels, CompressionConfig.parse("pooling:64"))
    small = visionzip.compress(clip, pixels, CompressionConfig.parse("downsample:64"))
    assert (pooled.tokens - small.tokens).abs().max() > 1e-2


def test_the_resize_is_pils_bicubic():
    """VTC-Bench resizes with PIL's BICUBIC (antialiased): the tensor resize agrees within uint8 rounding on
    average (plain bicubic without antialiasing is off by ~35-58 levels here, bilinear by 3-6)."""
    array = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype("uint8")
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float()
    for side in (8, 11, 13):
        pil = np.asarray(Image.fromarray(array).resize((side * 14, side * 14), resample=Image.BICUBIC), np.float32)
        ours = downsample_pixels(tensor, side, side, 14)[0].permute(1, 2, 0).clamp(0, 255).numpy()
        assert np.abs(pil - ours).mean() < 0.5, side


@torch.no_grad()
def test_siglip_without_cls():
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                  num_attention_heads=4, image_size=56, patch_size=14)).eval()
    pixels = torch.randn(2, 3, 56, 56)
    out = visionzip.compress(siglip, pixels, CompressionConfig.parse("downsample:4"))
    assert out.tokens.shape == (2, 4, 32) and not out.has_cls
    torch.testing.assert_close(out.tokens, reference_downsample(siglip, pixels, 2, 2), atol=1e-5, rtol=0)


def test_budget_rule_and_specs():
    assert "downsample" in visionzip.registered_methods()
    for tokens, side in ((64, 8), (144, 12), (128, 11), (192, 13), (16, 4), (1, 1)):
        settings = Downsample.from_budget(tokens)
        assert (settings.rows, settings.cols) == (side, side) and settings.tokens_per_view() == side * side
    for spec in ("downsample:64", "downsample:rows=8,cols=16"):
        config = CompressionConfig.parse(spec)
        assert config.stage == "tower"
        assert CompressionConfig.parse(config.spec()) == config
        assert CompressionConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "spec, message",
    [
        ("downsample:0", "visual tokens must be >= 1, got 0"),
        ("downsample:rows=0,cols=4", "rows must be >= 1, got 0"),
        ("downsample:1000", "a 31 x 31 grid (961 tokens) exceeds the 24 x 24 patch grid of a 336 px view"),
        ("downsample:rows=8,cols=30", "a 8 x 30 grid (240 tokens) exceeds the 24 x 24 patch grid"),
    ],
)
def test_bad_settings_raise_before_any_model_runs(spec, message, clip, pixels):
    with pytest.raises(ValueError) as err:
        visionzip.compress(clip, pixels[:1], CompressionConfig.parse(spec))
    assert message in str(err.value)


@pytest.mark.parametrize("version, views", [("v1.5", 1), ("v1.6", 3)])
def test_run_llava_and_the_llava_pipeline_at_64_tokens_per_view(version, views, official_checkpoints, tmp_path, capsys):
    from llava.eval.run_llava import main as run_llava
    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    path = str(official_checkpoints / f"llava-{version}-tiny")
    image = tmp_path / "image.png"
    picture = Image.fromarray((np.random.default_rng(7).random((300, 600, 3)) * 255).astype("uint8"))
    picture.save(image)
    assert run_llava(["--model-path", path, "--image-file", str(image), "--query", "What is shown?", "--temperature",
                      "0", "--max_new_tokens", "3", "--device", "cpu", "--compression", "downsample:64"]) == 0
    assert capsys.readouterr().out.strip()
    _, model, processor, _ = load_pretrained_model(path, None, None, device="cpu", compression="downsample:64")
    with torch.no_grad():
        features = model.get_image_features(process_images([picture], processor, model.config), [picture.size])
    assert features.views.tokens.shape[:2] == (views, 64)
    if version == "v1.5":
        assert features.per_image[0].shape[0] == 64


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_hugging_face_classes(family):
    """The transformers classes: the features are the projector applied to the re-statement's tokens, and a
    batch generates what each prompt generates alone."""
    model, processor = tiny_llava() if family == "llava" else tiny_llava_next()
    visionzip.apply_compression(model, "downsample:16")
    aware = compression_aware_processor(processor, model)
    prompts = ["USER: <image> what is in the picture ASSISTANT:", "USER: <image> describe it ASSISTANT:"]
    rng = np.random.default_rng(0)
    pics = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in ((120, 50), (50, 120))]
    batch = aware(text=prompts, images=pics, return_tensors="pt", padding=True)
    with torch.no_grad():
        kwargs = {} if family == "llava" else {"image_sizes": batch["image_sizes"]}
        features = model.get_image_features(pixel_values=batch["pixel_values"], **kwargs).pooler_output
        views = batch["pixel_values"] if family == "llava" else batch["pixel_values"][0]
        direct = reference_downsample(model.model.vision_tower, views, 4, 4)
        expected = model.model.multi_modal_projector(direct)
        if family == "llava":
            torch.testing.assert_close(torch.stack(list(features)), expected, atol=1e-5, rtol=0)
        else:
            assert features[0].shape[0] == (batch["input_ids"][0] == model.config.image_token_id).sum()
            torch.testing.assert_close(features[0][:16], expected[0], atol=1e-5, rtol=0)  # the base view first
        together = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for row in range(2):
            alone = aware(text=prompts[row : row + 1], images=pics[row : row + 1], return_tensors="pt", padding=True)
            single = model.generate(**alone, max_new_tokens=3, do_sample=False)[:, alone["input_ids"].shape[1]:]
            assert single.tolist() == together[row : row + 1].tolist()
