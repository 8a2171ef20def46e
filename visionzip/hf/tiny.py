"""Tiny random Hugging Face vision-language models and processors, built from configs in a fraction of a
second with no download: the shapes and code paths of the real families, gibberish answers. Tests, the
demo and the lmms-eval plugin's offline check use them.
"""
from __future__ import annotations

import torch

WORDS = (
    "a the is in of and what picture describe it image red square noisy background this shows "
    "USER: ASSISTANT: color car cat dog yes no left right top bottom corner"
).split()
SPECIAL = ("<unk>", "<pad>", "<s>", "</s>", "<image>")


def tiny_tokenizer():
    """A whitespace word-level fast tokenizer: ids 0..4 are <unk> <pad> <s> </s> <image>, then ``WORDS``;
    left padding (batched generation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + tuple(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # words at whitespace; <image> and the other special tokens are split out as added tokens
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def _tower_config(image_size: int = 112, patch_size: int = 14, layers: int = 3):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=2, projection_dim=32,
    )


def _text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )


def tiny_llava(seed: int = 0, image_size: int = 112):
    """(LlavaForConditionalGeneration, LlavaProcessor): CLIP tower of (image_size / 14)^2 + 1 tokens."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_tower_config(image_size), text_config=_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor


def tiny_llava_next(seed: int = 0, image_size: int = 112):
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor) with anyres pinpoints of 1x2, 2x1, 2x2 crops."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = tiny_tokenizer()
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_tower_config(image_size), text_config=_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor


def tiny_video_llava(seed: int = 0, image_size: int = 112):
    """VideoLlavaForConditionalGeneration with CLIP image and video towers of (image_size / 14)^2 + 1
    tokens, and its tokenizer (``<image>`` and ``<video>`` placeholders); no processor (transformers' video
    processor needs torchvision)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    torch.manual_seed(seed)
    config = VideoLlavaConfig(
        vision_config=_tower_config(image_size), text_config=_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
    )
    return VideoLlavaForConditionalGeneration(config).eval(), tokenizer


def tiny_onevision(seed: int = 0, image_size: int = 112):
    """(LlavaOnevisionForConditionalGeneration, tokenizer) with a SigLIP tower of (image_size / 14)^2 tokens
    (no CLS) and anyres pinpoints of 1x2, 2x1, 2x2 crops."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    tower = SiglipVisionConfig(
        image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2,
    )
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=tower, text_config=_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
    )
    return LlavaOnevisionForConditionalGeneration(config).eval(), tokenizer


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor): a 3-block window-attention ViT whose last
    block attends fully (as the real checkpoints' blocks 7, 15, 23, 31), 56-pixel windows (2 x 2 merge
    units), the 2 x 2 patch merger, and a 2-layer M-RoPE LLM. A 112 x 168 image is an 8 x 12 patch grid,
    24 merged tokens."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}
    )
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        depth=3, fullatt_block_indexes=[2], hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)

    class ImageTextQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """transformers' Qwen2.5-VL processor without its video processor, which needs torchvision."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=224 * 224)
    processor = ImageTextQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def tiny_internvl(seed: int = 0, image_size: int = 112, max_tiles: int = 4):
    """(InternVLForConditionalGeneration, InternVLProcessor): a 3-layer InternViT with qk-norm and CLS on
    ``image_size`` tiles of 14-pixel patches ((image_size / 14)^2 patches, pixel-shuffled 2 x 2 into
    (image_size / 28)^2 tokens per tile: 16 at 112), tiling of up to ``max_tiles`` tiles plus a thumbnail,
    and the ``<img>`` / ``<IMG_CONTEXT>`` / ``</img>`` placeholders."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        PreTrainedTokenizerFast,
    )

    base = tiny_tokenizer()
    base.add_special_tokens({"additional_special_tokens": ["<image>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]})
    # InternVLProcessor reads its placeholders from these named special tokens of the tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", padding_side="left",
        extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tokens_per_tile = (image_size // 28) ** 2
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=image_size,
        patch_size=14, use_qk_norm=True,
    )
    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config=vision, text_config=_text_config(len(tokenizer)).to_dict(),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=tokens_per_tile,
    )
    model = InternVLForConditionalGeneration(config).eval()

    class ImageTextInternVLProcessor(InternVLProcessor):
        """transformers' InternVL processor without its video processor, which needs torchvision."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template=chat_template, **kwargs)

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )
    processor = ImageTextInternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_tile
    )
    return model, processor
