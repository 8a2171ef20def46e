"""``load``: the ``NATIVE_FAMILIES["qwen"]`` loader of ``llava.model.builder.load_pretrained_model``.

A hub Qwen-VL / Qwen-VL-Chat folder (``config.json`` with ``model_type`` "qwen" and a ``visual`` entry,
``model.safetensors`` or ``pytorch_model*.bin`` with the remote-code keys, ``qwen.tiktoken``,
``generation_config.json``) -> ``(tokenizer, model, image_processor, context_len)``, no remote code run.
"""
from __future__ import annotations

import json
import os

import torch

from .config import QwenVLConfig
from .model import QwenVLForCausalLM
from .processor import QwenVLImageProcessor
from .tokenizer import QwenTokenizer


def _generation_settings(path: str) -> dict:
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def load(info, load_kwargs: dict, torch_dtype: torch.dtype, compression=None):
    """Load the checkpoint ``info.path`` (a ``llava.model.builder.CheckpointInfo``) with ``load_kwargs``
    (device_map, dtype, quantization), cast to ``torch_dtype``, set ``compression`` (None: the checkpoint's
    own ``visual_compression``)."""
    if "visual" not in info.config:
        raise ValueError(
            f"{info.path!r} has model_type 'qwen' but no 'visual' entry in its config.json: it is a text-only Qwen "
            "checkpoint, not Qwen-VL"
        )
    tokenizer = QwenTokenizer.from_pretrained(info.path)
    config = QwenVLConfig.from_pretrained(info.path)
    generation = _generation_settings(info.path)
    # the hub's generation_config.json names it; a folder saved by save_pretrained keeps it in config.json
    config.chat_format = generation.get("chat_format", getattr(config, "chat_format", "chatml"))
    kwargs = dict(load_kwargs)
    # [VisionZip-LLaVA] attention is SDPA here whatever the remote code's flags (use_flash_attn, bf16/fp16)
    kwargs["attn_implementation"] = "sdpa"
    model = QwenVLForCausalLM.from_pretrained(info.path, config=config, **kwargs)
    if "quantization_config" not in kwargs:
        # every tensor, as the official ``transformer.bfloat16()`` / ``.half()``: the resampler's fixed
        # ``pos_embed`` (no gradient) may load in the file's dtype otherwise
        model = model.to(dtype=torch_dtype)
    model.eval()
    stops = [tokenizer.eod_id]
    if config.chat_format == "chatml":  # the official chat() stops at <|im_end|> and <|im_start|> too
        stops = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # the checkpoint's own setting is checked as an explicit one would be
    model.set_visual_compression(compression if compression is not None else model.get_visual_compression())
    image_processor = QwenVLImageProcessor(config.visual["image_size"])
    return tokenizer, model, image_processor, int(config.max_position_embeddings)
