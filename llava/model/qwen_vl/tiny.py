"""A tiny random Qwen-VL-Chat checkpoint in the hub's layout, for tests and demos (built in about a second).

``build_tiny_qwen_vl(output_dir, seed=0)`` writes what the hub repository Qwen/Qwen-VL-Chat holds, small:

- ``config.json``: ``model_type`` "qwen", ``architectures`` ["QWenLMHeadModel"], the remote-code ``auto_map`` and
  every ``QWenConfig`` field, ``visual`` with the ViT / resampler kwargs (448 -> 112 px, 14 px patches: an 8 x 8
  grid; width 64, 2 blocks; ``output_dim`` = hidden 256: 2 resampler heads; the 256 queries kept);
  ``seq_length`` 256, so that a prompt with its 256 visual tokens runs past it and the dynamic-NTK and log-n
  paths of the official attention are exercised;
- ``model.safetensors``: the remote-code parameter names (``transformer.wte``, ``transformer.h.N.attn.c_attn``,
  ``transformer.visual.attn_pool.attn.in_proj_weight``, ..., ``lm_head``), random weights;
- ``qwen.tiktoken`` (256 bytes + BPE merges learned on a small embedded corpus, the hub's file format),
  ``tokenizer_config.json`` and ``generation_config.json`` (``chat_format`` "chatml").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

from .config import QwenVLConfig
from .tokenizer import SPECIAL_TOKENS, VOCAB_FILE, save_ranks, train_tiny_ranks

CORPUS = """\
You are a helpful assistant.
system user assistant Picture 1: Picture 2:
What is in the picture? Describe it. The picture shows a red square in the top left corner on a noisy background.
What color is the car? The car is red. How many people are in the image? There are two people in the image.
Is there a dog in the image? Answer the question using a single word or phrase. Yes. No.
What is the man holding? The man is holding an umbrella. Where was this photo taken? In a kitchen.
Describe the image in detail. A cat is sitting on a wooden table next to a window, looking outside.
What is written on the sign? The sign says stop. Answer: yes no red green blue one two three
"""
MERGES = 160


def tiny_config(num_ranks: int, **overrides) -> dict:
    """The config.json of the tiny checkpoint (the hub's keys and layout)."""
    image_start_id = num_ranks + SPECIAL_TOKENS.index("<img>")
    vocab = num_ranks + len(SPECIAL_TOKENS)
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 512,
        "kv_channels": 64,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 8192,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 256,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": False,
        "use_logn_attn": True,
        "visual": {
            "heads": 4,
            "image_size": 112,
            "image_start_id": image_start_id,
            "layers": 2,
            "mlp_ratio": 2.0,
            "output_dim": 256,
            "patch_size": 14,
            "width": 64,
        },
        "vocab_size": -(-vocab // 64) * 64,
    }
    config.update(overrides)
    return config


def random_state_dict(model, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every parameter (norm weights near 1, the rest Gaussian), the resampler's
    ``pos_embed`` kept (the official code builds it as a fixed sin-cos table; checkpoints hold it)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith("attn_pool.pos_embed"):
            out[name] = tensor.clone().contiguous()
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if ("ln" in name.split(".")[-2] or name.split(".")[-2].startswith("ln_")) and name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.02 * noise
        elif name.endswith("positional_embedding") or name.endswith("attn_pool.query"):
            value = 0.5 * noise
        elif name.endswith("attn.in_proj.weight") or name.endswith("attn.in_proj_weight"):
            # sharper attention than a plain 1/sqrt(fan_in) draw: queries that attend to different patches and
            # patches that receive different attention (no near-ties among the scores a selection ranks)
            value = 3.0 * noise * tensor.shape[-1] ** -0.5
        elif name.endswith(".proj") or tensor.dim() == 1:
            value = tensor.shape[0] ** -0.5 * noise
        else:
            value = noise * (tensor.shape[-1] ** -0.5 if tensor.dim() > 1 else 0.02)
        out[name] = value.to(tensor.dtype).contiguous()
    return out


def build_tiny_qwen_vl(output_dir: str, seed: int = 0, **config_overrides) -> str:
    """Write the tiny checkpoint into ``output_dir``, which must not exist or be empty (written in a temporary
    folder beside it, then moved in place)."""
    from .model import QwenVLForCausalLM

    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ValueError(f"{output_dir!r} exists and is not an empty folder: the tiny checkpoint needs a new one")

    ranks = train_tiny_ranks(CORPUS, MERGES)
    config_dict = tiny_config(len(ranks), **config_overrides)
    torch.manual_seed(seed)
    model = QwenVLForCausalLM(QwenVLConfig(**config_dict))
    weights = random_state_dict(model, seed)
    eod = len(ranks)
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny-qwen-vl-", dir=parent)
    try:
        save_ranks(ranks, os.path.join(staging, VOCAB_FILE))
        save_file(weights, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config_dict, handle, indent=2)
        generation = {"chat_format": "chatml", "eos_token_id": eod, "pad_token_id": eod, "stop_words_ids": [[eod]],
                      "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "max_window_size": 6144}
        with open(os.path.join(staging, "generation_config.json"), "w", encoding="utf-8") as handle:
            json.dump(generation, handle, indent=2)
        tokenizer_config = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
        with open(os.path.join(staging, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
            json.dump(tokenizer_config, handle, indent=2)
        if os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random Qwen-VL-Chat checkpoint in the hub's layout.")
    parser.add_argument("output_dir", help="a new (or empty) folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_qwen_vl(args.output_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
