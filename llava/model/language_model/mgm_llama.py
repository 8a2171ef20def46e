"""Mini-Gemini (MGM) on a LLaMA / Vicuna language model: ``MGMConfig`` (``model_type`` "mgm", as MGM's
checkpoints have it) and ``MGMLlamaForCausalLM``, registered with ``AutoConfig`` / ``AutoModelForCausalLM``.

MGM (dvlab-research/MGM at 769820c, ``mgm/model/language_model/mgm_llama.py``, ``mgm/model/mgm_arch.py``) is
LLaVA-1.5 with a second, high-resolution tower: the CLIP ViT-L/14-336 (LR, 576 patch tokens) is the one LLaVA
has; an OpenCLIP ConvNeXt-L (HR, ``model.vision_tower_aux``, ``llava.model.mgm.convnext``) encodes the same
image at ``image_size_aux`` (768 px); each LR token mines the HR features of its own region
(``llava.model.mgm.mining``), the result is added to the token, and ``mm_projector`` maps it to the LLM: 576
visual tokens per image, spliced as LLaVA splices them. Everything after the image features (splice, LLM,
in-LLM pruning, ``generate``, ``cache=``) is ``LlavaLlamaForCausalLM``'s.

Images: ``images`` is the HR image (what ``load_pretrained_model``'s image processor makes for this model:
the CLIP processor set to ``image_size_aux``); the LR view is its bilinear resize, as MGM's loaders derive
it. MGM's own call, ``images=LR, images_aux=HR``, is accepted too.

Compression (``docs/mgm.md``): vision-side methods act on the CLIP tower's 576 LR tokens, through the tower's
``encode`` as on LLaVA; the HR tower runs whole and mining runs for the kept tokens only; in-LLM methods prune
the 576 (mined) tokens in the LLM.

Refused, by name: the HD variants (``image_grid`` > 1, ``image_global``), a ``cls_patch`` feature selection,
a checkpoint without the mining projectors' weights. The other MGM language models (Mixtral-8x7B:
``mgm_mixtral``, Gemma-2B: ``mgm_gemma``) are other model types, not registered here; Hermes-Yi-34B and
LLaMA-3-8B checkpoints are ``mgm`` (LLaMA layers) and load, with their own ``--conv-mode``.
"""
from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..llava_arch import ImageFeatures, ProjectedTokens
from ..mgm.convnext import ConvNeXtAuxTower
from ..mgm.images import MGMImages, hr_image_processor, lr_from_hr
from ..mgm.mining import build_mining_projectors, mine_patches, mining_patches
from ..multimodal_encoder.vision_tower import CLIPVisionTower
from .llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel, resolve_tower_setting

MINING_PROJECTORS = ("vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")
DEFAULT_IMAGE_SIZE_AUX = 320  # MGM's default when a config has no image_size_aux (initialize_uni_modules)


class MGMConfig(LlavaConfig):
    """A LLaMA config plus LLaVA's ``mm_*`` keys and MGM's: ``mm_vision_tower_aux``, ``mm_hidden_size_aux``,
    ``image_size_aux``, ``optimize_vision_tower_aux``, ``image_grid``, ``image_global``."""

    model_type = "mgm"


def check_mgm_config(config) -> None:
    """What this implementation runs of MGM: a ValueError naming anything else, before any weight loads."""
    grid = int(getattr(config, "image_grid", 1) or 1)
    if grid != 1 or getattr(config, "image_global", False):
        raise ValueError(
            f"image_grid={grid}, image_global={getattr(config, 'image_global', False)}: the MGM-HD variants (LR "
            "image split into a grid plus a global view) are not implemented here; MGM-7B / 13B (image_grid 1) are"
        )
    if getattr(config, "mm_vision_tower", None) and not getattr(config, "mm_vision_tower_aux", None):
        raise ValueError("an mgm checkpoint names its HR tower in mm_vision_tower_aux; this config has none")
    feature = getattr(config, "mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ValueError(f"MGM mines one HR cell per LR patch: mm_vision_select_feature must be 'patch', got {feature!r}")


class MGMLowResTower(CLIPVisionTower):
    """MGM's CLIP tower (LR). Its ``image_processor`` makes the model's input, the HR image (``image_size_aux``):
    the LR view the tower encodes is derived from it inside the model (``llava.model.mgm.images``)."""

    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        self.image_size_aux = int(getattr(args, "image_size_aux", DEFAULT_IMAGE_SIZE_AUX))
        super().__init__(vision_tower, args, delay_load)

    def load_model(self, device_map=None, **kwargs) -> None:
        super().load_model(device_map=device_map, **kwargs)
        self.image_processor = hr_image_processor(self.processor_class, self.vision_tower_name, self.image_size_aux)

    def build_model(self) -> None:
        super().build_model()
        self.image_processor = hr_image_processor(self.processor_class, self.vision_tower_name, self.image_size_aux)


class MGMLlamaModel(LlavaLlamaModel):
    """The base model: LLaVA's (CLIP tower, ``mm_projector``, LLaMA layers) plus ``vision_tower_aux`` and the
    three mining projectors, under MGM's parameter names."""

    config_class = MGMConfig

    def __init__(self, config):
        check_mgm_config(config)
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = MGMLowResTower(config.mm_vision_tower, config, delay_load=True)
            self.vision_tower_aux = ConvNeXtAuxTower(config.mm_vision_tower_aux, config, delay_load=True)
            for name, module in build_mining_projectors(int(config.mm_hidden_size), int(config.mm_hidden_size_aux)).items():
                setattr(self, name, module)

    def get_vision_tower_aux(self) -> ConvNeXtAuxTower | None:
        return getattr(self, "vision_tower_aux", None)

    def load_vision_tower_aux(self, checkpoint_dir: str | None = None) -> ConvNeXtAuxTower | None:
        """Load the HR tower from ``mm_vision_tower_aux`` (the OpenCLIP folder), on the device and in the dtype
        of the token embeddings. With ``optimize_vision_tower_aux`` (the tower was trained), its stem and stages
        come from the checkpoint's ``model.vision_tower_aux.*`` keys instead, as MGM's ``initialize_uni_modules``
        loads them."""
        tower = self.get_vision_tower_aux()
        if tower is None or tower.is_loaded:
            return tower
        tower.load_model()
        if getattr(self.config, "optimize_vision_tower_aux", False):
            if checkpoint_dir is None:
                raise ValueError("optimize_vision_tower_aux is set: the trained HR tower's weights need the checkpoint folder")
            trained = read_checkpoint_prefix(checkpoint_dir, "model.vision_tower_aux.")
            if not trained:
                raise ValueError(f"optimize_vision_tower_aux is set but {checkpoint_dir} has no model.vision_tower_aux.* weights")
            tower.load_state_dict(trained, strict=True)
        reference = self.embed_tokens.weight
        if reference.device.type != "meta":
            tower.to(device=reference.device, dtype=reference.dtype)
        return tower


class MGMLlamaForCausalLM(LlavaLlamaForCausalLM):
    """LLaMA causal LM with MGM's image input: ``forward(..., images=HR)`` / ``generate(inputs, images=HR)``,
    or MGM's ``images=LR, images_aux=HR``; visual tokens compressed per ``config.visual_compression``."""

    config_class = MGMConfig
    # both towers load from their own folders (as in MGM); copies of their weights in a checkpoint are ignored
    # (a trained HR tower, optimize_vision_tower_aux, is read from the checkpoint by load_vision_tower_aux)
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\.", r"^model\.vision_tower_aux\."]
    inner_model_class = MGMLlamaModel

    def get_model(self) -> MGMLlamaModel:
        return self.model

    def get_vision_tower_aux(self) -> ConvNeXtAuxTower | None:
        return self.get_model().get_vision_tower_aux()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_vision_tower: bool = True, **kwargs):
        """``LlavaLlamaForCausalLM.from_pretrained`` plus: ``mm_vision_tower_aux`` resolves inside or beside the
        checkpoint folder as ``mm_vision_tower`` does, the HR tower is loaded with the CLIP tower, and a
        checkpoint without the mining projectors' weights is refused (MGM would run them untrained)."""
        path = str(pretrained_model_name_or_path)
        resolve_tower_setting("mm_vision_tower_aux", path, kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, load_vision_tower=load_vision_tower, output_loading_info=True, **kwargs
        )
        missing = sorted(k for k in info.get("missing_keys", ()) if any(name in k for name in MINING_PROJECTORS))
        if missing:
            raise ValueError(f"{path} has no weights for MGM's patch-info mining ({missing[:3]}...): not an MGM checkpoint")
        if load_vision_tower:
            model.get_model().load_vision_tower_aux(path if os.path.isdir(path) else None)
        return (model, info) if wants_info else model

    # ----- the image pipeline -------------------------------------------------------------------
    def get_image_features(self, pixel_values, image_sizes=None, project_views=None) -> ImageFeatures:
        """``LlavaMetaForCausalLM.get_image_features`` on MGM's input: the HR images (B, 3, S_aux, S_aux), or an
        ``MGMImages`` (LR, HR) pair -> 576 (or the compressed count) tokens per image."""
        if isinstance(pixel_values, MGMImages):
            projected = self.project_views(pixel_values.hr, pixel_values.lr)
            return ImageFeatures(list(projected.tokens.unbind(0)), projected)
        return super().get_image_features(pixel_values, image_sizes, project_views)

    def project_views(self, views: torch.Tensor, views_lr: torch.Tensor | None = None) -> ProjectedTokens:
        """HR views (V, 3, S_aux, S_aux) (and their LR views (V, 3, S, S), default: derived) -> ``ProjectedTokens``.

        MGM's ``encode_images``: LR tokens from the CLIP tower (with any vision-side compression: ``VisionTower.encode``
        as on LLaVA), the HR map from the ConvNeXt, each token plus what it mines from its HR cell, then
        ``mm_projector``. Compressed tokens mine per ``llava.model.mgm.mining.mining_patches``."""
        size_aux = int(getattr(self.config, "image_size_aux", DEFAULT_IMAGE_SIZE_AUX))
        if views.ndim != 4 or tuple(views.shape[1:]) != (3, size_aux, size_aux):
            raise ValueError(
                f"MGM takes the HR image, (V, 3, {size_aux}, {size_aux}) pixels (image_size_aux {size_aux}: the image "
                f"processor load_pretrained_model returns makes them); got shape {tuple(views.shape)}"
            )
        tower = self.get_vision_tower()
        if views_lr is None:
            views_lr = lr_from_hr(views, tower.image_size)
        elif views_lr.shape[0] != views.shape[0]:
            raise ValueError(f"{views_lr.shape[0]} LR images but {views.shape[0]} HR images (images_aux)")
        tokens, compressed = tower.encode(views_lr, self.get_visual_compression())
        model = self.get_model()
        query = model.vlm_uni_query_projector
        dtype = query[1].weight.dtype
        hr = model.get_vision_tower_aux()(views).to(device=tokens.device, dtype=dtype)
        tokens = tokens.to(dtype)
        patches = None if compressed is None else mining_patches(compressed, tower.num_patches)
        tokens = tokens + mine_patches(
            tokens, hr, patches, query, model.vlm_uni_aux_projector, model.vlm_uni_val_projector,
            tower.num_patches_per_side,
        )
        projector = model.mm_projector
        weight = next(projector.parameters(), None)
        if weight is not None and weight.dtype.is_floating_point:
            tokens = tokens.to(weight.dtype)
        return ProjectedTokens(projector(tokens), compressed)

    def encode_images(self, images: torch.Tensor, images_aux: torch.Tensor | None = None) -> torch.Tensor:
        """MGM's call: ``images`` (B, 3, S, S) LR and ``images_aux`` (B, 3, S_aux, S_aux) HR -> (B, T, hidden);
        ``images`` alone is taken as the HR image."""
        if images_aux is None:
            return self.project_views(images).tokens
        return self.project_views(images_aux, images).tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.FloatTensor | None = None,
        image_sizes: list | None = None,
        visual_mask: torch.Tensor | None = None,
        host_input_ids: torch.Tensor | None = None,
        host_attention_mask: torch.Tensor | None = None,
        images_aux: torch.FloatTensor | None = None,
        **kwargs,
    ):
        """``LlavaLlamaForCausalLM.forward``; ``images_aux`` (HR) with ``images`` (LR): MGM's call."""
        if images_aux is not None:
            images = MGMImages(images, images_aux)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, images=images, image_sizes=image_sizes,
            visual_mask=visual_mask, host_input_ids=host_input_ids, host_attention_mask=host_attention_mask, **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None,
                 images_aux: torch.Tensor | None = None, **kwargs):
        """``LlavaLlamaForCausalLM.generate``; ``images_aux`` (HR) with ``images`` (LR): MGM's call."""
        if images_aux is not None:
            images = MGMImages(images, images_aux)
        return super().generate(inputs, images=images, image_sizes=image_sizes, **kwargs)


def read_checkpoint_prefix(folder: str, prefix: str) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (prefix stripped) from a checkpoint folder: ``model.safetensors``,
    ``pytorch_model.bin``, or their sharded forms (through the ``*.index.json`` weight map)."""
    from ..llava_arch import load_weights_file

    files = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            files = sorted({name for key, name in weight_map.items() if key.startswith(prefix)})
            break
    else:
        files = [name for name in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, name))][:1]
    out = {}
    for name in files:
        weights = load_weights_file(os.path.join(folder, name))
        out.update({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return out


AutoConfig.register("mgm", MGMConfig)
AutoModelForCausalLM.register(MGMConfig, MGMLlamaForCausalLM)
