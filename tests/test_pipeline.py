"""``visionzip.pipeline``: the stages every model path runs (encode, project, layout, placeholder count),
and the LLaVA-NeXT spatial layout on transformers' ``LlavaNextForConditionalGeneration``: the same tiny
checkpoint, in our format and converted to llava-hf, gives the same greedy tokens in both paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPVisionConfig, CLIPVisionModel, LlavaNextForConditionalGeneration

import visionzip
from llava.convert import to_hf
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.tiny import build_tiny_llava
from visionzip import CompressedTokens, encoder_adapter, get_method
from visionzip.hf import compression_aware_processor
from visionzip.pipeline import CropGrid, ViewTokens, encode_views, layout_image, placeholder_count, project

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


# ----- the stages on synthetic tensors -----------------------------------------------------------------
def synthetic_views(side=4, crops=(1, 2), per_view=6, cls_kept=True, merged=2, hidden=8, seed=0) -> ViewTokens:
    """1 + rows * cols compressed views of side^2 patches (+ CLS): per_view tokens each, the first
    per_view - merged at sorted random encoder positions (CLS = 0 first when kept)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = crops
    views = 1 + rows * cols
    kept = per_view - merged
    keep = []
    for _ in range(views):
        patches = torch.randperm(side * side, generator=generator)[: kept - int(cls_kept)] + 1
        keep.append(torch.cat([torch.zeros(int(cls_kept), dtype=torch.long), patches.sort().values]))
    tokens = torch.randn(views, per_view, hidden, generator=generator)
    return ViewTokens(tokens, CompressedTokens(tokens, torch.stack(keep), has_cls=True, cls_kept=cls_kept))


@pytest.mark.parametrize("image_size", [(40, 18), (18, 40), (30, 30)])
@pytest.mark.parametrize("cls_kept", [True, False])
def test_placeholder_count_is_the_length_of_every_layout(image_size, cls_kept):
    side, per_view = 4, 6
    views = synthetic_views(side, (1, 2), per_view, cls_kept)
    grid = CropGrid(1, 2, side, image_size)
    newline = torch.full((8,), 7.0)
    crops = views.slice(1, 3).compressed
    for layout, line in (("flat", None), ("official", None), ("official", newline), ("spatial", None), ("spatial", newline)):
        out = layout_image(views, layout, grid, line)
        kept = crops if layout == "spatial" and line is not None else None
        assert out.shape[0] == placeholder_count(layout, 3, per_view, grid, newline=line is not None, kept=kept)
        assert out.shape[1] == 8
    # vanilla (uncompressed) NeXT views: the count from the geometry alone
    vanilla = ViewTokens(torch.randn(3, side * side, 8), None)
    for line in (None, newline):
        out = layout_image(vanilla, "spatial", grid, line)
        assert out.shape[0] == placeholder_count("spatial", 3, side * side, grid, newline=line is not None, compressed=False)
    # one view: its tokens, then the newline
    single = layout_image(views.slice(0, 1), "spatial", None, newline)
    assert single.shape[0] == placeholder_count("spatial", 1, per_view, newline=True) == per_view + 1
    assert torch.equal(single[-1], newline)


def test_spatial_layout_with_unpad_needs_the_kept_positions_and_bad_input_is_named():
    grid = CropGrid(1, 2, 4, (40, 18))
    with pytest.raises(ValueError, match="kept="):
        placeholder_count("spatial", 3, 6, grid, newline=True)
    with pytest.raises(ValueError, match="unknown visual-token layout 'diagonal'"):
        placeholder_count("diagonal", 3, 6, grid)
    with pytest.raises(ValueError, match="2 crops"):
        layout_image(synthetic_views(), "official", CropGrid(2, 2, 4, (40, 18)))


def test_spatial_layout_cuts_the_padding_rows_and_ends_each_kept_row_with_the_newline():
    # a 2 x 1 grid (rows) of 2 x 2 patches on a wide image: unpad keeps rows 1 and 2 of the 4-row map
    side, hidden = 2, 3
    keep = torch.tensor([[0, 1, 4]] * 3)  # CLS + patches 0 = (0, 0) and 3 = (1, 1) of each crop
    tokens = torch.arange(3 * 3 * hidden, dtype=torch.float32).reshape(3, 3, hidden)
    views = ViewTokens(tokens, CompressedTokens(tokens, keep, has_cls=True, cls_kept=True))
    newline = torch.full((hidden,), -1.0)
    out = layout_image(views, "spatial", CropGrid(2, 1, side, (40, 20)), newline)
    # crop 0: (0, 0) cut, (1, 1) kept; crop 1: (2, 0) kept, (3, 1) cut; then the crops' CLS tokens
    expected = torch.stack([tokens[1, 2], newline, tokens[2, 1], newline, tokens[1, 0], tokens[2, 0]])
    assert torch.equal(out[: tokens.shape[1]], tokens[0])
    assert torch.equal(out[tokens.shape[1] :], expected)


@pytest.fixture(scope="module")
def clip():
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


def test_encode_views_is_one_tower_pass_with_or_without_a_method(clip):
    adapter = encoder_adapter(clip)
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        plain = encode_views(adapter, pixels, -2, None)
        full = clip(pixels, output_hidden_states=True).hidden_states[-2]
        method = get_method("visionzip").from_budget(6)
        compressed = encode_views(adapter, pixels, -2, method)
        direct = method.encode(adapter, pixels, -2)
    assert plain.compressed is None and torch.equal(plain.tokens, full[:, 1:])
    assert torch.equal(encode_views(adapter, pixels, -2, None, drop_cls=False).tokens, full)
    assert torch.equal(compressed.tokens, direct.tokens) and torch.equal(compressed.compressed.keep_indices, direct.keep_indices)
    # an in-LLM method leaves the tower's output whole
    assert encode_views(adapter, pixels, -2, get_method("fastv").from_budget(6)).compressed is None
    projector = torch.nn.Linear(32, 16).to(torch.float64)
    projected = project(projector, compressed)
    assert projected.tokens.dtype == torch.float64 and projected.tokens.shape == (3, 6, 16)
    assert projected.compressed is compressed.compressed


# ----- the spatial layout on LlavaNextForConditionalGeneration, against our LLaVA ----------------------
@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    """A tiny LLaVA-NeXT (spatial_unpad) in our format, loaded by our builder, and its llava-hf conversion."""
    root = tmp_path_factory.mktemp("next")
    ours_dir = build_tiny_llava(str(root / "ours"), "v1.6", hidden=64, vision_hidden=32, vision_layers=2)
    to_hf(ours_dir, str(root / "hf"))
    tokenizer, ours, image_processor, _ = load_pretrained_model(
        ours_dir, None, "llava-v1.6-tiny", device="cpu", torch_dtype=torch.float32
    )
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    return tokenizer, ours.eval(), image_processor, hf, str(root / "hf")


def wide_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((300, 500, 3)) * 255).astype("uint8"))  # 500 x 300: unpad cuts columns


@pytest.mark.parametrize("spec", ["visionzip:64", "vispruner:32"])
@pytest.mark.parametrize("layout", ["spatial", "official"])
def test_converted_next_checkpoint_gives_the_same_greedy_tokens_in_both_paths(next_pair, layout, spec):
    tokenizer, ours, image_processor, hf, _ = next_pair
    image = wide_image()
    pixels = process_images([image], image_processor, ours.config)  # the same pixels for both paths
    input_ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    visionzip.apply_compression(ours, spec, anyres_layout=layout)
    visionzip.apply_compression(hf, spec, anyres_layout=layout)
    try:
        with torch.no_grad():
            ours_features = ours.get_image_features(pixels, [image.size]).per_image[0]
            ours_tokens = ours.generate(input_ids, images=pixels, image_sizes=[image.size], max_new_tokens=6,
                                        do_sample=False)
            image_sizes = torch.tensor([[image.size[1], image.size[0]]])  # HF: (height, width)
            hf_pixels = pixels[0][None]
            features = hf.model.get_image_features(pixel_values=hf_pixels, image_sizes=image_sizes).pooler_output[0]
            # what the compression-aware processor writes, from the same pixels, before the model runs
            counts = visionzip.hf.llava_next.placeholder_counts(
                hf, get_method(spec.split(":")[0]).from_budget(int(spec.split(":")[1])),
                {"pixel_values": hf_pixels, "image_sizes": image_sizes},
            )
            ids = input_ids[0].tolist()
            at = ids.index(-200)
            hf_ids = torch.tensor([ids[:at] + [hf.config.image_token_id] * counts[0] + ids[at + 1 :]])
            hf_tokens = hf.generate(input_ids=hf_ids, pixel_values=hf_pixels, image_sizes=image_sizes,
                                    max_new_tokens=6, do_sample=False)[:, hf_ids.shape[1]:]
    finally:
        visionzip.apply_compression(ours, "none")
        visionzip.apply_compression(hf, "none")
    assert counts == [features.shape[0]] == [ours_features.shape[0]]
    torch.testing.assert_close(features, ours_features, atol=1e-5, rtol=1e-5)
    # official: 3 views x the budget; spatial: the newlines of the kept rows, less the kept tokens unpad cut
    assert (features.shape[0] == 3 * int(spec.split(":")[1])) == (layout == "official")
    assert hf_tokens.tolist() == ours_tokens.tolist()


def test_compression_aware_processor_counts_the_spatial_layout(next_pair):
    _, _, _, hf, hf_dir = next_pair
    processor = AutoProcessor.from_pretrained(hf_dir)
    visionzip.apply_compression(hf, "visionzip:64", anyres_layout="spatial")
    try:
        aware = compression_aware_processor(processor, hf)
        inputs = aware(text=[PROMPT.replace("<image>\n", "<image>")] * 2, images=[wide_image(), wide_image().rotate(90, expand=True)],
                       return_tensors="pt", padding=True)
        with torch.no_grad():
            features = hf.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            out = hf.generate(**inputs, max_new_tokens=2, do_sample=False)
        found = (inputs["input_ids"] == hf.config.image_token_id).sum(1).tolist()
        assert found == [f.shape[0] for f in features.pooler_output]
        assert found[0] != found[1]  # the count follows the kept positions of each image
        assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
        # a processor's output without tensors (one array of views per image) counts the same
        arrays = {"pixel_values": [p.numpy() for p in inputs["pixel_values"]], "image_sizes": inputs["image_sizes"].tolist()}
        assert visionzip.hf.llava_next.placeholder_counts(hf, get_method("visionzip").from_budget(64), arrays) == found
    finally:
        visionzip.apply_compression(hf, "none")
