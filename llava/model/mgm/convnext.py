"""Mini-Gemini's high-resolution (HR) tower: the trunk of OpenCLIP's ConvNeXt, written natively (no
open_clip / timm dependency), with the parameter names MGM's checkpoints use.

MGM (dvlab-research/MGM at 769820c, ``mgm/model/multimodal_encoder/openclip_encoder.py``) builds OpenCLIP's
``convnext_large_d_320`` (a timm ``convnext_large`` trunk: depths 3/3/27/3, widths 192/384/768/1536), drops
its head, and keeps ``clip_model.visual.trunk.stem`` as ``vision_stem`` and ``...trunk.stages`` as
``vision_stages``. Its ``backbone`` runs the stem and the four stages, upsamples stages 1-3 bilinearly
(``align_corners=False``, in float32) to stage 0's grid and concatenates the four along channels:
``(B, 192 + 384 + 768 + 1536 = 2880, S/4, S/4)`` (``mm_hidden_size_aux``).

The computation is timm's ConvNeXt (huggingface/pytorch-image-models at aa4b585, ``timm/models/convnext.py``:
``ConvNeXtBlock`` with ``conv_mlp=False``, ``ConvNeXtStage``; ``timm/layers/norm.py``: ``LayerNorm2d``):

- stem: Conv2d(3, C0, k=4, s=4) -> LayerNorm2d (eps 1e-6)             ``vision_stem.{0,1}``
- stage i > 0 starts with LayerNorm2d(C_{i-1}) -> Conv2d(k=2, s=2)     ``vision_stages.i.downsample.{0,1}``
- each block: depthwise Conv2d(k=7, pad 3) -> channels-last LayerNorm (eps 1e-6) -> Linear(C, 4C) -> GELU
  -> Linear(4C, C) -> times ``gamma`` (layer scale) -> + input         ``vision_stages.i.blocks.j.{conv_dw,
  norm, mlp.fc1, mlp.fc2, gamma}``

The structure (widths, depths, kernel, MLP width, layer scale) is read from the weights themselves, so the
same class loads the real ConvNeXt-L and the tiny test towers. Weights come from the OpenCLIP folder named
by ``mm_vision_tower_aux`` (``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``, keys
``visual.trunk.stem.*`` / ``visual.trunk.stages.*``), as MGM's ``load_model`` reads them.

[VisionZip-LLaVA] MGM's aux tower keeps timm's DropPath (rate 0.1) and is created after ``from_pretrained``
has put the model in eval mode, so the official inference runs stochastic depth in the HR tower (its
outputs vary from run to run). This tower has no DropPath: it computes what the official tower computes
in eval mode.
"""
from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TRUNK_PREFIX = "visual.trunk."
LAYER_NORM_EPS = 1e-6  # timm's LayerNorm / LayerNorm2d default; OpenCLIP's ConvNeXt configs keep it


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtMlp(nn.Module):
    """fc1 -> GELU -> fc2 on channels-last features (timm's ``Mlp``, no dropout)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): depthwise conv, channels-last LayerNorm + MLP, layer scale, residual."""

    def __init__(self, channels: int, kernel_size: int = 7, mlp_hidden: int | None = None, layer_scale: bool = True):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.mlp = ConvNeXtMlp(channels, mlp_hidden or 4 * channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class ConvNeXtStage(nn.Module):
    """An optional 2x downsample (LayerNorm2d + Conv2d k=2 s=2) then ``depth`` blocks."""

    def __init__(self, in_channels: int, channels: int, depth: int, downsample: bool, kernel_size: int = 7,
                 mlp_hidden: int | None = None, layer_scale: bool = True):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_channels, eps=LAYER_NORM_EPS), nn.Conv2d(in_channels, channels, 2, stride=2)
            )
        else:
            if in_channels != channels:
                raise ValueError(f"a stage without downsample keeps its width; got {in_channels} -> {channels}")
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[ConvNeXtBlock(channels, kernel_size, mlp_hidden, layer_scale) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def convnext_layout(trunk: dict[str, torch.Tensor]) -> dict:
    """The ConvNeXt structure a trunk state dict (keys ``stem.*``, ``stages.*``) describes: widths, depths,
    patch (stem stride), kernel size, MLP width ratio and whether blocks have layer scale."""
    if "stem.0.weight" not in trunk:
        raise ValueError(f"not a ConvNeXt trunk: no stem.0.weight among {sorted(trunk)[:5]}...")
    patch = int(trunk["stem.0.weight"].shape[-1])
    stage_ids = sorted({int(m.group(1)) for k in trunk if (m := re.match(r"stages\.(\d+)\.", k))})
    if stage_ids != list(range(len(stage_ids))) or not stage_ids:
        raise ValueError(f"ConvNeXt stages must be numbered 0..n-1, got {stage_ids}")
    widths, depths, downsample = [], [], []
    kernel, ratio, layer_scale = None, None, None
    for i in stage_ids:
        blocks = sorted({int(m.group(1)) for k in trunk if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))})
        if not blocks:
            raise ValueError(f"ConvNeXt stage {i} has no blocks")
        dw = trunk[f"stages.{i}.blocks.0.conv_dw.weight"]
        widths.append(int(dw.shape[0]))
        depths.append(len(blocks))
        downsample.append(f"stages.{i}.downsample.1.weight" in trunk)
        kernel = int(dw.shape[-1])
        ratio = trunk[f"stages.{i}.blocks.0.mlp.fc1.weight"].shape[0] / widths[-1]
        layer_scale = f"stages.{i}.blocks.0.gamma" in trunk
    return {"widths": widths, "depths": depths, "downsample": downsample, "patch": patch, "kernel": kernel,
            "mlp_ratio": ratio, "layer_scale": layer_scale}


def read_openclip_trunk(folder: str) -> dict[str, torch.Tensor]:
    """The ConvNeXt trunk's weights (``visual.trunk.stem.*`` / ``stages.*``, prefix stripped) from an
    OpenCLIP model folder (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``)."""
    for name in OPENCLIP_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        trunk = {k[len(TRUNK_PREFIX):]: v for k, v in state.items()
                 if k.startswith(TRUNK_PREFIX + "stem.") or k.startswith(TRUNK_PREFIX + "stages.")}
        if not trunk:
            raise ValueError(f"{path} holds no {TRUNK_PREFIX}stem / stages weights (an OpenCLIP ConvNeXt is expected)")
        return trunk
    raise ValueError(
        f"cannot load MGM's aux tower: {folder!r} has none of {OPENCLIP_WEIGHTS} (the OpenCLIP ConvNeXt folder "
        "named by mm_vision_tower_aux)"
    )


class ConvNeXtAuxTower(nn.Module):
    """MGM's HR tower (``model.vision_tower_aux``): ``vision_stem`` + ``vision_stages`` of an OpenCLIP ConvNeXt.

    ``delay_load=True`` (how a checkpoint builds it, as MGM does): only the folder name is kept; ``load_model``
    reads the weights and builds the modules. ``forward(images (B, 3, S, S))`` -> (B, sum of widths, S/p, S/p).
    """

    def __init__(self, vision_tower_aux: str, args=None, delay_load: bool = True):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower_aux
        self.expected_hidden_size = getattr(args, "mm_hidden_size_aux", None)
        self.layout: dict | None = None
        if not delay_load:
            self.load_model()

    def build(self, layout: dict) -> None:
        """The modules for ``layout`` (``convnext_layout``), with placeholder weights."""
        widths = layout["widths"]
        if self.expected_hidden_size is not None and sum(widths) != int(self.expected_hidden_size):
            raise ValueError(
                f"the aux ConvNeXt {self.vision_tower_name!r} has stage widths {widths} (sum {sum(widths)}) but the "
                f"checkpoint's mm_hidden_size_aux is {self.expected_hidden_size}"
            )
        self.vision_stem = nn.Sequential(
            nn.Conv2d(3, widths[0], layout["patch"], stride=layout["patch"]), LayerNorm2d(widths[0], eps=LAYER_NORM_EPS)
        )
        stages, previous = [], widths[0]
        for width, depth, down in zip(widths, layout["depths"], layout["downsample"]):
            stages.append(ConvNeXtStage(previous, width, depth, down, layout["kernel"],
                                        int(round(layout["mlp_ratio"] * width)), layout["layer_scale"]))
            previous = width
        self.vision_stages = nn.ModuleList(stages)
        self.layout = layout

    def load_model(self, device_map=None, **kwargs) -> None:
        """Build the tower from the OpenCLIP folder's weights (frozen, as MGM keeps it)."""
        if self.is_loaded:
            return
        trunk = read_openclip_trunk(self.vision_tower_name)
        self.build(convnext_layout(trunk))
        state = {("vision_stem." + k[len("stem."):] if k.startswith("stem.") else "vision_" + k): v
                 for k, v in trunk.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"aux ConvNeXt weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.requires_grad_(False)
        self.is_loaded = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, sum C_i, S/p, S/p): every stage's output at stage 0's grid (MGM's ``backbone``)."""
        if not self.is_loaded:
            raise ValueError(f"the aux tower {self.vision_tower_name!r} is not loaded yet (call load_model())")
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            x = self.vision_stem(images.to(device=self.device, dtype=self.dtype))
            outputs = []
            for stage in self.vision_stages:
                x = stage(x)
                outputs.append(x)
        size = outputs[0].shape[-2:]
        maps = [outputs[0]] + [
            F.interpolate(o.float(), size=size, mode="bilinear", align_corners=False).to(o.dtype) for o in outputs[1:]
        ]
        return torch.cat(maps, dim=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_stem[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_stem[0].weight.device

    @property
    def hidden_size(self) -> int:
        if self.layout is not None:
            return sum(self.layout["widths"])
        return int(self.expected_hidden_size)

    @property
    def stride(self) -> int:
        """Input pixels per stage-0 feature (the stem's patch)."""
        return int(self.layout["patch"]) if self.layout is not None else 4


def openclip_config(widths, depths, image_size: int) -> dict:
    """An ``open_clip_config.json`` for a ConvNeXt trunk (what the OpenCLIP hub folders carry; informative:
    the structure is read from the weights)."""
    return {"model_cfg": {"embed_dim": widths[-1], "vision_cfg": {
        "timm_model_name": "convnext", "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "mlp",
        "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": image_size,
        "widths": list(widths), "depths": list(depths)}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}


def write_openclip_folder(folder: str, tower: ConvNeXtAuxTower, image_size: int) -> None:
    """Save ``tower`` as an OpenCLIP folder (``open_clip_pytorch_model.bin`` with ``visual.trunk.*`` keys)."""
    os.makedirs(folder, exist_ok=True)
    state = {}
    for key, value in tower.state_dict().items():
        name = key[len("vision_"):] if key.startswith("vision_") else key
        state[TRUNK_PREFIX + name] = value.detach().clone().contiguous()
    torch.save(state, os.path.join(folder, "open_clip_pytorch_model.bin"))
    with open(os.path.join(folder, "open_clip_config.json"), "w", encoding="utf-8") as handle:
        json.dump(openclip_config(tower.layout["widths"], tower.layout["depths"], image_size), handle, indent=2)
