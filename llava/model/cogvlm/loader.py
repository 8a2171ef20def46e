"""``load_pretrained_model`` for CogVLM checkpoints (``llava.model.builder.NATIVE_FAMILIES["cogvlm"]``).

Reads the hub's remote-code checkpoint (THUDM/cogvlm-chat-hf: ``config.json`` + sharded safetensors or
bin) into ``CogVLMForCausalLM`` without running its code. The hub repository ships no tokenizer (the
official demo loads ``lmsys/vicuna-7b-v1.5``'s): the tokenizer is read from the checkpoint folder when it
has one, else from ``tokenizer_path=`` (``load_pretrained_model(..., tokenizer_path=PATH)``).
"""
from __future__ import annotations

import os

from llava.model.tokenizer import load_tokenizer

from .config import CogVLMConfig
from .modeling import CogVLMForCausalLM
from .processor import CogVLMImageProcessor

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def _tokenizer_dir(path: str, tokenizer_path: str | None) -> str:
    if tokenizer_path is not None:
        if not os.path.isdir(tokenizer_path):
            raise ValueError(f"tokenizer_path {tokenizer_path!r} is not a folder")
        return tokenizer_path
    if any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return path
    raise ValueError(
        f"{path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): CogVLM uses Vicuna-7B-v1.5's LLaMA tokenizer; "
        "copy its tokenizer files into the checkpoint folder or pass tokenizer_path=FOLDER"
    )


def load(info, load_kwargs: dict, torch_dtype, compression):
    """-> (tokenizer, model, image_processor, context_len); see ``llava.model.builder.NATIVE_FAMILIES``."""
    kwargs = dict(load_kwargs)
    tokenizer_path = kwargs.pop("tokenizer_path", None)
    # the model always runs SDPA (its own attention, no transformers attention interface)
    kwargs.pop("attn_implementation", None)
    if "num_multi_query_heads" in info.config:
        raise ValueError(
            f"{info.path!r} is a CogVLM2 checkpoint (LLaMA-3, grouped-query attention, a convolution after the "
            "tower): only CogVLM (cogvlm-chat-hf, LLaMA-2-7B / Vicuna) is implemented here"
        )
    tokenizer = load_tokenizer(_tokenizer_dir(info.path, tokenizer_path))
    config = CogVLMConfig.from_pretrained(info.path)
    model = CogVLMForCausalLM.from_pretrained(info.path, config=config, **kwargs)
    if "quantization_config" not in kwargs and model.dtype != torch_dtype:
        model = model.to(dtype=torch_dtype)
    model = model.eval()
    if compression is not None:
        model.set_visual_compression(compression)
    image_processor = CogVLMImageProcessor(config.vision_config["image_size"])
    return tokenizer, model, image_processor, int(config.max_position_embeddings)
