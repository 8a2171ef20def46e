"""A deterministic tiny Mini-Gemini checkpoint in MGM's original layout (random weights: the shapes, file
formats, parameter names and code paths are real; the answers are gibberish).

``build_tiny_mgm(output_dir, seed=0)`` writes:

- ``openai-clip-vit-tiny-336/``: a CLIP vision tower in ViT-L/14-336's token geometry (336 px, patch 14, 576
  patches + CLS) with a small width and depth, and its image-processor config (``mm_vision_tower``);
- ``openclip-convnext-tiny/``: an OpenCLIP-format ConvNeXt (``open_clip_pytorch_model.bin``, keys
  ``visual.trunk.stem.*`` / ``visual.trunk.stages.*``, 4 stages, stem stride 4) of small widths
  (``mm_vision_tower_aux``);
- the tokenizer of the tiny LLaVA (``llava.model.tiny``), ``config.json`` (``model_type`` "mgm",
  ``architectures`` ["MGMLlamaForCausalLM"], MGM's keys: ``mm_vision_tower_aux``, ``mm_hidden_size_aux``,
  ``image_size_aux`` 768, ``optimize_vision_tower(_aux)``, ``image_grid`` 1, ``image_global`` false);
- the weights sharded as MGM's ``initialize_uni_modules`` reads them (``model.safetensors.index.json`` +
  ``model-00001-of-00001.safetensors``): the LLM, ``model.mm_projector.*``, ``model.vlm_uni_{query,aux,val}_projector.*``
  and the towers' copies (``model.vision_tower.vision_tower.vision_model.*``, ``model.vision_tower_aux.vision_stem.*``,
  ``model.vision_tower_aux.vision_stages.*``), as MGM's training saves a model whose towers are loaded.

A folder that already holds the same build is reused as is.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..tiny import TOWER_DIR as LLAVA_TOWER_DIR
from ..tiny import build_tiny_llava, write_stamped_build
from .convnext import ConvNeXtAuxTower, write_openclip_folder
from .mining import build_mining_projectors

TOWER_DIR = "openai-clip-vit-tiny-336"
AUX_DIR = "openclip-convnext-tiny"
STAMP = "tiny_mgm_build.json"
BUILD_FORMAT = 1
SHARD = "model-00001-of-00001.safetensors"


def _random_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a value that makes its layer matter (default inits leave LayerNorms at 1 / 0 and
    ConvNeXt's layer scale at 1e-6, which would hide mistakes)."""
    for name, param in module.named_parameters():
        with torch.no_grad():
            if name.endswith("gamma"):
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif param.ndim == 1 and name.endswith("weight"):  # the norms' scales
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * fan_in**-0.5)


def _write(directory: str, seed: int, sizes: dict) -> None:
    llava_dir = os.path.join(directory, ".llava")
    build_tiny_llava(llava_dir, "v1.5", seed, hidden=sizes["hidden"], layers=sizes["layers"],
                     vision_hidden=sizes["vision_hidden"], vocab=sizes["vocab"], vision_layers=sizes["vision_layers"])
    for name in os.listdir(llava_dir):
        source = os.path.join(llava_dir, name)
        if name == LLAVA_TOWER_DIR:
            shutil.copytree(source, os.path.join(directory, TOWER_DIR))
        elif name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy2(source, os.path.join(directory, name))
    state = load_file(os.path.join(llava_dir, "model.safetensors"))
    with open(os.path.join(llava_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    shutil.rmtree(llava_dir)

    generator = torch.Generator().manual_seed(seed + 7)
    widths, depths = list(sizes["aux_widths"]), list(sizes["aux_depths"])
    aux = ConvNeXtAuxTower(AUX_DIR)
    aux.build({"widths": widths, "depths": depths, "downsample": [False] + [True] * (len(widths) - 1), "patch": 4,
               "kernel": 7, "mlp_ratio": 4.0, "layer_scale": True})
    _random_(aux, generator)
    write_openclip_folder(os.path.join(directory, AUX_DIR), aux, sizes["image_size_aux"])
    for key, value in aux.state_dict().items():
        state["model.vision_tower_aux." + key] = value.detach().clone()
    for name, module in build_mining_projectors(sizes["vision_hidden"], sum(widths)).items():
        _random_(module, generator)
        for key, value in module.state_dict().items():
            state[f"model.{name}.{key}"] = value.detach().clone()

    config.update(
        model_type="mgm", architectures=["MGMLlamaForCausalLM"], mm_vision_tower=TOWER_DIR, mm_vision_tower_aux=AUX_DIR,
        mm_hidden_size_aux=sum(widths), image_size_aux=sizes["image_size_aux"], optimize_vision_tower=False,
        optimize_vision_tower_aux=False, image_grid=1, image_global=False, image_aspect_ratio="pad",
    )
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, SHARD), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: SHARD for k in sorted(state)}}, handle, indent=2)


def build_tiny_mgm(
    output_dir: str,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 5,
    vocab: int = 512,
    aux_widths: tuple[int, ...] = (8, 8, 16, 16),
    aux_depths: tuple[int, ...] = (1, 1, 2, 1),
    image_size_aux: int = 768,
) -> str:
    """Write the tiny MGM checkpoint to ``output_dir`` (or reuse the same build there); returns the path.

    The LR tower keeps ViT-L/14-336's token geometry (5 layers: the shallowest where every vision-side method
    reaches 64 tokens); the HR input keeps MGM-7B's 768 px (a 192 x 192 stage-0 map, 8 x 8 HR features per LR
    patch). Deterministic in ``seed``; the global torch RNG state is left as it was."""
    sizes = {"hidden": hidden, "layers": layers, "vision_hidden": vision_hidden, "vision_layers": vision_layers,
             "vocab": vocab, "aux_widths": list(aux_widths), "aux_depths": list(aux_depths), "image_size_aux": image_size_aux}
    if len(aux_widths) != len(aux_depths) or not aux_widths or min(aux_widths) < 1 or min(aux_depths) < 1:
        raise ValueError(f"aux_widths {aux_widths} and aux_depths {aux_depths} must be positive, one of each per stage")
    stem_grid = image_size_aux // 4 // 2 ** (len(aux_widths) - 1)
    if image_size_aux % 96 or stem_grid < 1:
        raise ValueError(f"image_size_aux must be a multiple of 96 (its stage-0 map, /4, cut into the 24 x 24 LR grid), got {image_size_aux}")
    stamp = {"format": BUILD_FORMAT, "seed": seed, **sizes}
    generator_state = torch.random.get_rng_state()
    try:
        return write_stamped_build(output_dir, STAMP, stamp, "MGM", lambda staging: _write(staging, seed, sizes))
    finally:
        torch.random.set_rng_state(generator_state)
