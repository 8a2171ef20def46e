"""A deterministic tiny CogVLM checkpoint in the hub's remote-code layout (THUDM/cogvlm-chat-hf), for tests.

``build_tiny_cogvlm(output_dir, seed=0)`` writes ``config.json`` (the hub's keys: ``architectures``
``CogVLMForCausalLM``, ``auto_map`` to the remote files, ``template_version``, ``vision_config`` as a dict),
``model.safetensors`` with the remote state dict's names (``model.vision.*``, the experts, every layer's
``self_attn.rotary_emb.inv_freq``), and a SentencePiece LLaMA tokenizer trained on a small embedded corpus
(``llava.model.tiny``'s). Random weights; the geometry is small: a 140 px image in 14 px patches (100
patches + CLS, so that 64-token budgets select), a 3-layer tower, a 4-layer LLM (the paper depth rules of PyramidDrop and SparseVLM need 4).
A folder that already holds the same build is reused.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..tiny import write_stamped_build
from .config import CogVLMConfig

STAMP = "tiny_cogvlm_build.json"
BUILD_FORMAT = 2
# what the hub's config.json points its remote code at (kept so that the file looks like the hub's)
AUTO_MAP = {"AutoConfig": "configuration_cogvlm.CogVLMConfig", "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"}


def tiny_config(vocab_size: int, hidden: int = 32, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 3,
                image_size: int = 140) -> CogVLMConfig:
    patches = (image_size // 14) ** 2
    vision = {
        "dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": vision_layers,
        "hidden_size": vision_hidden, "patch_size": 14, "num_heads": 4, "intermediate_size": 2 * vision_hidden,
        "layer_norm_eps": 1e-06, "num_positions": patches + 1, "image_size": image_size,
    }
    return CogVLMConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, vision_config=vision, template_version="chat",
                        architectures=["CogVLMForCausalLM"], auto_map=dict(AUTO_MAP))


def _write(directory: str, seed: int, sizes: dict) -> None:
    from llava.model.tiny import _train_tokenizer
    from llava.model.tokenizer import LlavaLlamaTokenizer

    from .modeling import CogVLMForCausalLM

    state = torch.random.get_rng_state()
    try:
        vocab = _train_tokenizer(directory, sizes["vocab"], "Question: What is in the image? Answer: A cat.\n")
        LlavaLlamaTokenizer(vocab_file=os.path.join(directory, "tokenizer.model")).save_pretrained(directory)
        config = tiny_config(vocab, sizes["hidden"], sizes["layers"], sizes["vision_hidden"], sizes["vision_layers"],
                             sizes["image_size"])
        torch.manual_seed(seed)
        model = CogVLMForCausalLM(config).eval()
        with torch.no_grad():
            # the init leaves boi / eoi and the norms at constants: random values make the tests see them
            for name, param in model.named_parameters():
                if name.endswith(("boi", "eoi", "cls_embedding")) or "norm" in name:
                    param.add_(torch.randn_like(param) * 0.1)
                elif param.dim() >= 2:
                    param.normal_(0.0, 0.2)
        config.save_pretrained(directory)
        # the hub's config class declares no model_type, so its config.json has none: the builder knows the
        # checkpoint by its architecture (llava.model.builder.NATIVE_ARCHITECTURES)
        config_file = os.path.join(directory, "config.json")
        with open(config_file, encoding="utf-8") as handle:
            saved = json.load(handle)
        for key in ("model_type", "visual_compression"):
            saved.pop(key, None)
        with open(config_file, "w", encoding="utf-8") as handle:
            json.dump(saved, handle, indent=2)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    finally:
        torch.random.set_rng_state(state)


def build_tiny_cogvlm(output_dir: str, seed: int = 0, hidden: int = 32, layers: int = 4, vision_hidden: int = 32,
                      vision_layers: int = 3, image_size: int = 140, vocab: int = 512) -> str:
    """Write (or reuse) the tiny checkpoint in ``output_dir``; returns its path. The global RNG is restored."""
    sizes = {"hidden": hidden, "layers": layers, "vision_hidden": vision_hidden, "vision_layers": vision_layers,
             "image_size": image_size, "vocab": vocab}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if image_size % 14:
        raise ValueError(f"image_size must be a multiple of the 14 px patch, got {image_size}")
    stamp = {"format": BUILD_FORMAT, "seed": seed, **sizes}
    return write_stamped_build(output_dir, STAMP, stamp, "CogVLM", lambda staging: _write(staging, seed, sizes))
