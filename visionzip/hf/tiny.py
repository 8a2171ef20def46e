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
    core.pre_tokenizer = pre_tokenizers.Split(r"(<image>|\s+)", behavior="isolated")
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
