"""Prompts, tokenization and preprocessing helpers, and the NeXT layout arithmetic, without models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import SeparatorStyle, conv_templates, default_conversation, get_conv_template
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
)
from llava.model.anyres import compressed_spatial_layout, spatial_features, unpad_bounds, unpad_image
from llava.model.tokenizer import LlavaLlamaTokenizer, load_tokenizer
from visionzip import CompressedTokens

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.fixture(scope="module")
def tokenizer(official_dir):
    return load_tokenizer(str(official_dir / "llava-v1.5-tiny"))


@pytest.fixture(scope="module")
def processor(official_dir):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(str(official_dir / "clip-vit-tiny-336"))


def two_turns(name: str) -> str:
    conv = get_conv_template(name)
    conv.append_message(conv.roles[0], "<image>\nQ1")
    conv.append_message(conv.roles[1], "A1")
    conv.append_message(conv.roles[0], "Q2")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_templates_write_the_original_prompts():
    assert default_conversation is conv_templates["vicuna_v1"]
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert two_turns("vicuna_v1") == system + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert two_turns("llava_v1").startswith("A chat between a curious human")
    assert two_turns("v1_mmtag").endswith("following format: <Image>visual content</Image>. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:")
    assert two_turns("plain") == "<image>\nQ1\nA1\nQ2\n"
    assert two_turns("chatml_direct") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )
    assert two_turns("mistral_instruct") == "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]"
    llama2 = two_turns("llava_llama_2")
    assert llama2.startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant.")
    assert llama2.endswith("<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]")
    assert conv_templates["llava_llama_2"].sep_style == SeparatorStyle.LLAMA_2
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_conv_template("vicuna_v9")


def test_templates_are_not_shared_between_copies():
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "hi")
    assert conv_templates["vicuna_v1"].messages == []


def test_tokenizer_is_sentencepiece_and_round_trips(tokenizer, tmp_path):
    assert isinstance(tokenizer, LlavaLlamaTokenizer)
    # "\n" goes through the model's nmt_nfkc normalizer (a space), as with the original slow tokenizer
    assert tokenizer("a\nb").input_ids == tokenizer("a b").input_ids
    # no extra prefix space after a special token (legacy: false)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("x</s>USER").input_ids)
    assert tokens[tokens.index("</s>") + 1] == "US"
    tokenizer.save_pretrained(tmp_path)
    assert '"tokenizer_class": "LlamaTokenizer"' in (tmp_path / "tokenizer_config.json").read_text()
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, LlavaLlamaTokenizer)
    assert again("USER: <image>\nWhat? ASSISTANT:").input_ids == tokenizer("USER: <image>\nWhat? ASSISTANT:").input_ids


def test_tokenizer_image_token(tokenizer):
    ids = tokenizer_image_token("A <image>\nB <image> C", tokenizer)
    assert ids.count(IMAGE_TOKEN_INDEX) == 2 and ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    first = tokenizer("A ").input_ids
    assert ids[: len(first)] == first and ids[len(first)] == IMAGE_TOKEN_INDEX
    assert tokenizer_image_token("<image>", tokenizer) == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert tokenizer_image_token("x", tokenizer, return_tensors="pt").dtype == torch.long
    with pytest.raises(ValueError, match="unsupported return_tensors"):
        tokenizer_image_token("x", tokenizer, return_tensors="np")


def test_select_best_resolution_and_grid():
    # every pinpoint holds a 336 x 336 image whole: the first of the least wasteful wins
    assert select_best_resolution((336, 336), PINPOINTS) == (336, 672)
    assert select_best_resolution((500, 375), PINPOINTS) == (672, 672)
    assert select_best_resolution((300, 640), PINPOINTS) == (336, 672)
    assert select_best_resolution((1000, 300), PINPOINTS) == (1008, 336)
    assert get_anyres_image_grid_shape((500, 375), PINPOINTS, 336) == (2, 2)
    assert get_anyres_image_grid_shape((1000, 300), str(PINPOINTS), 336) == (3, 1)
    with pytest.raises(ValueError, match="not a list literal"):
        get_anyres_image_grid_shape((10, 10), "[[336,", 336)


def test_pad_and_resize_geometry():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    square = expand2square(image, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((20, 20)) == (255, 255, 255)
    padded = resize_and_pad_image(Image.new("RGB", (448, 224), (255, 255, 255)), (672, 672))
    # width fits exactly (x 1.5), height 224 * 1.5 = 336, centred on black: rows 168 .. 503
    assert padded.size == (672, 672)
    assert padded.getpixel((336, 167)) == (0, 0, 0) and padded.getpixel((336, 168)) == (255, 255, 255)
    assert padded.getpixel((336, 503)) == (255, 255, 255) and padded.getpixel((336, 504)) == (0, 0, 0)


def test_process_images_modes(processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in [(500, 375), (300, 640)]]

    class Cfg:
        image_aspect_ratio = "pad"
        image_grid_pinpoints = PINPOINTS

    pad = process_images(images, processor, Cfg)
    assert pad.shape == (2, 3, 336, 336)
    # the padding rows hold the processor's mean colour (int(m * 255)), which normalises to ~0
    assert pad[0, :, :10].abs().max() < 0.02
    Cfg.image_aspect_ratio = "anyres"
    anyres = process_images(images, processor, Cfg)
    assert isinstance(anyres, list) and [x.shape[0] for x in anyres] == [5, 3]
    Cfg.image_aspect_ratio = "square"
    assert process_images(images, processor, Cfg).shape == (2, 3, 336, 336)


def test_unpad_and_vanilla_spatial_layout():
    # (rows, cols) = (1, 2) crops of 2 x 2 patches -> a 2 x 4 map; a wide image keeps the middle row(s)
    assert unpad_bounds(4, 4, (400, 200)) == (1, 3, 0, 4)
    assert unpad_bounds(4, 4, (200, 400)) == (0, 4, 1, 3)
    tensor = torch.arange(16.0).view(1, 4, 4)
    assert unpad_image(tensor, (400, 200)).shape == (1, 2, 4)
    crops = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # two crops, 2x2 patches, 1 channel
    flat = spatial_features(crops, grid_rows=1, grid_cols=2, side=2, image_size=(4, 2), newline=None)
    assert flat.flatten().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    newline = torch.tensor([-1.0])
    unpadded = spatial_features(crops, 1, 2, 2, image_size=(4, 2), newline=newline)
    # a 4:2 image on a 4 x 2 map keeps both rows; a newline after each
    assert unpadded.flatten().tolist() == [0, 1, 4, 5, -1, 2, 3, 6, 7, -1]


def test_compressed_spatial_layout_orders_kept_tokens_on_the_grid():
    # two crops of 2 x 2 patches (+CLS at position 0), side by side; each keeps CLS + 2 patches + 1 merged
    keep = torch.tensor([[0, 2, 4], [0, 1, 3]])  # crop 0: patches 1, 3; crop 1: patches 0, 2
    tokens = torch.tensor([[[10.0], [11.0], [13.0], [19.0]], [[20.0], [21.0], [23.0], [29.0]]])
    crops = CompressedTokens(tokens, keep, has_cls=True, cls_kept=True)
    newline = torch.tensor([-1.0])
    out = compressed_spatial_layout(crops, grid_rows=1, grid_cols=2, side=2, image_size=(4, 2), newline=newline)
    # grid: row 0 = crop0 p1 (col 1), crop1 p0 (col 2); row 1 = crop0 p3 (col 1), crop1 p2 (col 2)
    assert out.flatten().tolist() == [11, 21, -1, 13, 23, -1, 10, 20, 19, 29]
    no_unpad = compressed_spatial_layout(crops, 1, 2, 2, image_size=(4, 2), newline=None)
    assert no_unpad.flatten().tolist() == [11, 21, 13, 23, 10, 20, 19, 29]


def test_keyword_stopping_and_model_names(tokenizer):
    prompt = torch.tensor([tokenizer("USER: hi ASSISTANT:").input_ids])
    stop = KeywordsStoppingCriteria(["</s>"], tokenizer, prompt)
    ids = torch.cat([prompt, torch.tensor([[300]])], dim=1)
    assert stop(ids, None).tolist() == [False]
    assert stop(torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1), None).tolist() == [True]
    assert get_model_name_from_path("/ckpts/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert get_model_name_from_path("/ckpts/run/checkpoint-200") == "run_checkpoint-200"


def test_siglip_tower_has_no_cls(tmp_path):
    """SigLIP: "patch" keeps every token; VisionZip scores by received attention; no "cls_patch"."""
    from types import SimpleNamespace

    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    from llava.model.multimodal_encoder.builder import build_vision_tower
    from llava.model.multimodal_encoder.vision_tower import SiglipVisionTower
    from visionzip import CompressionConfig

    torch.manual_seed(0)
    config = SiglipVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=3, num_attention_heads=4)
    SiglipVisionModel(config).save_pretrained(tmp_path)
    SiglipImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(tmp_path)
    args = SimpleNamespace(mm_vision_tower=str(tmp_path), mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    tower = build_vision_tower(args)
    assert isinstance(tower, SiglipVisionTower) and tower.num_patches == 16
    pixels = process_images([Image.new("RGB", (70, 50), (9, 99, 199))], tower.image_processor,
                            SimpleNamespace(image_aspect_ratio="square"))
    features, compressed = tower.encode(pixels)
    assert features.shape == (1, 16, 32) and compressed is None
    tokens, compressed = tower.encode(pixels, CompressionConfig(method="visionzip", dominant=4, contextual=2))
    assert tokens.shape == (1, 6, 32) and not compressed.cls_kept
    with pytest.raises(ValueError, match="exceeds the 16 tokens"):
        tower.check_compression(CompressionConfig(method="visionzip", dominant=15, contextual=2))
    with pytest.raises(ValueError, match="'cls_patch' needs a CLS token"):
        build_vision_tower(SimpleNamespace(**{**vars(args), "mm_vision_select_feature": "cls_patch"}))
