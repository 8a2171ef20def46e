"""Build the vision tower a config names, choosing CLIP or SigLIP by the encoder's own config."""
from __future__ import annotations

import json
import os

from transformers import AutoConfig

from .vision_tower import CLIPVisionTower, SiglipVisionTower, VisionTower

# model_type of the encoder config (a vision config, or a full two-tower config) -> tower class
TOWERS: dict[str, type[VisionTower]] = {
    "clip_vision_model": CLIPVisionTower,
    "clip": CLIPVisionTower,
    "siglip_vision_model": SiglipVisionTower,
    "siglip": SiglipVisionTower,
}


def resolve_vision_tower_path(vision_tower: str, checkpoint_dir: str | None = None) -> str:
    """Where a checkpoint's ``mm_vision_tower`` lives.

    A relative name that exists inside the checkpoint folder or beside it (in its parent folder, as in the
    official fixtures) resolves there, as an absolute path; else one that exists relative to the working
    directory (the original's behaviour); anything else is returned unchanged (a hub id).
    """
    if not vision_tower or os.path.isabs(vision_tower):
        return vision_tower
    if checkpoint_dir:
        checkpoint_dir = os.path.abspath(checkpoint_dir)
        for base in (checkpoint_dir, os.path.dirname(checkpoint_dir)):
            candidate = os.path.join(base, vision_tower)
            if os.path.isdir(candidate):
                return candidate
    if os.path.isdir(vision_tower):
        return os.path.abspath(vision_tower)
    return vision_tower


def vision_tower_type(vision_tower: str) -> str:
    """The encoder's ``model_type``, read from its config.json (local folder or cached hub id)."""
    config_file = os.path.join(vision_tower, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as handle:
            return json.load(handle).get("model_type", "")
    return AutoConfig.from_pretrained(vision_tower).model_type


def build_vision_tower(vision_tower_cfg, **kwargs) -> VisionTower:
    """The tower named by ``mm_vision_tower`` (or ``vision_tower``) of a model config or model arguments."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not name:
        raise ValueError("no vision tower configured: set mm_vision_tower (model config) or vision_tower (args)")
    try:
        model_type = vision_tower_type(name)
    except OSError as err:
        raise ValueError(
            f"cannot find the vision tower {name!r}: not a local folder, and not a hub id available here"
        ) from err
    if model_type not in TOWERS:
        raise ValueError(f"unsupported vision tower {name!r} (model_type {model_type!r}); supported: {sorted(TOWERS)}")
    return TOWERS[model_type](name, args=vision_tower_cfg, **kwargs)
